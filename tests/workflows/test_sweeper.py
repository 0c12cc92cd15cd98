"""The sweeper terminates managed machines nobody owns once the grace period has passed."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from temporalio.client import WorkflowHandle

from providers.base import LaunchRequest
from tests.conftest import eventually
from tests.workflows.conftest import ControlPlaneHarness, ec2_instances, eventually_async
from tests.workflows.test_spill import spill_policy
from workflows.sweeper import SWEEPER_ID
from workflows.types import SweeperStatus

REGION = "eu-north-1"


async def test_a_machine_nobody_owns_is_terminated_after_the_grace_period(
    control: ControlPlaneHarness, tmp_path: Path, moto_server: str, aws_credentials: None
) -> None:
    name = control.name("chat")
    control.write_policy(spill_policy(name, f"reserved-{control.suffix}", "/models/chat"))
    host = await control.start(moto_server=moto_server, leak_grace_s=3)
    aws = host.plane.providers["aws"]
    # A machine left behind by a provision that no longer runs (a crash before bookkeeping).
    key = f"provision-{name}-{uuid.uuid4().hex[:8]}.0"
    request = LaunchRequest(
        key=key,
        instance_type="p5.48xlarge",
        region=REGION,
        image="ami-12c6146b",
        allowed_regions=frozenset({REGION}),
    )
    launched_at = time.monotonic()
    await asyncio.to_thread(aws.launch, request)
    assert [m["key"] for m in ec2_instances(moto_server, REGION, key)] == [key]

    await eventually(lambda: not ec2_instances(moto_server, REGION, key), within_s=30, interval=0.2)
    assert time.monotonic() - launched_at >= 3  # not before the grace period
    sweeper: WorkflowHandle[object, object] = host.client.get_workflow_handle(SWEEPER_ID)

    async def recorded() -> bool:
        status = await sweeper.query("state", result_type=SweeperStatus)
        return any(key in line for line in status.terminated)

    await eventually_async(recorded, within_s=10)
