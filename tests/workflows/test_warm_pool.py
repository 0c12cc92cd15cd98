"""The warm pool, end to end: a release stops the rented machine, the next spill starts it again.

The same control plane as ``test_spill``: a saturated reserved replica, EC2 on a real moto
server, stand-in agents for the rented machines, weights prefetched from S3 (moto). With
``release: stop`` the spilled replica's machine is stopped (not terminated) once drained, and
labelled warm; the next spill starts that same machine, whose agent registers again and finds
its weights complete, instead of launching a new one. The sweeper keeps a warm machine past the
leak grace period and terminates it once it has been stopped longer than ``max_stopped_s``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
from temporalio.client import WorkflowHandle

from providers.base import LaunchRequest
from tests.conftest import eventually
from tests.workflows.conftest import ControlPlaneHarness, ec2_instances, eventually_async
from tests.workflows.test_spill import safetensors, spill_policy, start_saturated_reserved
from workflows.sweeper import SWEEPER_ID
from workflows.types import SweeperStatus

#: Big enough that downloading it is a visible part of a cold start on loopback.
WEIGHT_BYTES = 96 << 20
REGION = "eu-north-1"


def upload_big_weights(moto_server: str, bucket: str) -> str:
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="chat/config.json", Body=b'{"architectures": ["Chat"]}')
    s3.put_object(Bucket=bucket, Key="chat/model.safetensors", Body=safetensors(WEIGHT_BYTES))
    return f"s3://{bucket}/chat/"


def all_instances(moto_server: str, key_prefix: str) -> list[dict[str, Any]]:
    """Every EC2 instance of the prefix in the region, whatever its state."""
    client = boto3.client("ec2", region_name=REGION, endpoint_url=moto_server)
    found = []
    for reservation in client.describe_instances()["Reservations"]:
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            if tags.get("spillway:key", "").startswith(key_prefix):
                found.append({"tags": tags, **instance})
    return found


def rented_replica(control: ControlPlaneHarness, name: str) -> tuple[str, str] | None:
    """(agent id, replica id) of the healthy replica not on the reserved agent."""
    for agent, replica in control.replicas(name):
        if agent != f"reserved-{control.suffix}":
            return agent, replica
    return None


async def provision_seconds(control: ControlPlaneHarness, replica_id: str) -> float:
    """How long the replica's provision ran: from its start to the replica reported healthy."""
    client = await control.client()
    handle = client.get_workflow_handle(f"provision-{replica_id}")
    await handle.result()
    described = await handle.describe()
    assert described.close_time is not None
    return (described.close_time - described.start_time).total_seconds()


async def test_a_released_machine_is_stopped_and_the_next_spill_starts_it_again(
    control: ControlPlaneHarness, tmp_path: Path, moto_server: str, aws_credentials: None
) -> None:
    weights = upload_big_weights(moto_server, f"weights-{uuid.uuid4().hex[:8]}")
    pool = f"reserved-{control.suffix}"
    policy = spill_policy(
        control.name("chat"),
        pool,
        weights,
        release="stop",
        warm_pool={"max_machines": 1, "max_stopped_s": 600},
    )
    name, host = await start_saturated_reserved(control, tmp_path, moto_server, policy)
    prefix = f"provision-{name}-"
    assert control.scheduler is not None
    load = control.load(name, per_replica=10)
    load.start()

    # Out, cold: a new machine is launched and the weights are downloaded onto it.
    await eventually(lambda: rented_replica(control, name) is not None, within_s=120)
    found = rented_replica(control, name)
    assert found is not None
    agent, first_replica = found
    record = control.scheduler.fleet.get(agent)
    assert record is not None
    instance_id = record.registration.labels.instance_id
    key = record.registration.labels.extra["spillway-key"]
    cold_s = await provision_seconds(control, first_replica)
    [weights_file] = list((tmp_path / "weights" / name).rglob("model.safetensors"))
    fetched = weights_file.stat()
    assert fetched.st_size > WEIGHT_BYTES

    # Back: drained, then stopped, labelled warm, not terminated.
    await load.stop()

    def stopped() -> bool:
        machines = all_instances(moto_server, prefix)
        return [(m["InstanceId"], m["State"]["Name"]) for m in machines] == [
            (instance_id, "stopped")
        ]

    await eventually(stopped, within_s=90, interval=0.2)
    [machine] = all_instances(moto_server, prefix)
    assert machine["tags"]["spillway-deployment"] == name
    assert float(machine["tags"]["spillway-warm"]) > time.time() - 120
    assert "spillway-claim" not in machine["tags"]

    async def released() -> bool:
        status = await host.status(name)
        return any("stopped into the warm pool" in line for line in status.recent)

    await eventually_async(released, within_s=20)
    await eventually(lambda: rented_replica(control, name) is None, within_s=30)

    # Out again, warm: the same machine is started; nothing new is launched or downloaded.
    load = control.load(name, per_replica=10)
    load.start()
    await eventually(lambda: rented_replica(control, name) is not None, within_s=120)
    found = rented_replica(control, name)
    assert found is not None
    again_agent, second_replica = found
    assert second_replica != first_replica and again_agent == agent
    record = control.scheduler.fleet.get(again_agent)
    assert record is not None
    assert record.registration.labels.instance_id == instance_id
    assert record.registration.labels.extra["spillway-key"] == key
    warm_s = await provision_seconds(control, second_replica)
    machines = all_instances(moto_server, prefix)
    assert [(m["InstanceId"], m["State"]["Name"]) for m in machines] == [(instance_id, "running")]
    assert machines[0]["tags"]["spillway-claim"] == f"provision-{second_replica}"
    assert "spillway-warm" not in machines[0]["tags"]
    again = weights_file.stat()
    assert (again.st_ino, again.st_mtime_ns) == (fetched.st_ino, fetched.st_mtime_ns)
    # The durations are reported, not asserted (a shared machine's timing is not a result):
    # what makes the warm start faster is asserted above (same machine, weights untouched).
    print(f"time to serving: cold {cold_s:.2f}s, warm {warm_s:.2f}s")

    async def served_warm() -> bool:
        return any(
            f"{second_replica} serving on aws" in line for line in (await host.status(name)).recent
        )

    await eventually_async(served_warm, within_s=20)


async def test_the_sweeper_keeps_a_warm_machine_then_terminates_it_when_it_expires(
    control: ControlPlaneHarness, tmp_path: Path, moto_server: str, aws_credentials: None
) -> None:
    name = control.name("chat")
    policy = spill_policy(
        name,
        f"reserved-{control.suffix}",
        "/models/chat",
        release="stop",
        warm_pool={"max_machines": 2, "max_stopped_s": 8},
    )
    # Nothing to serve (no replica wanted), so no provision takes the machine out of the pool.
    policy["deployments"][name]["min_replicas"] = 0
    control.write_policy(policy)
    host = await control.start(moto_server=moto_server, leak_grace_s=1)
    aws = host.plane.providers["aws"].inner  # type: ignore[attr-defined]
    # A machine a release stopped into the pool (the provision that launched it is over).
    key = f"provision-{name}-{uuid.uuid4().hex[:8]}.0"
    request = LaunchRequest(
        key=key,
        instance_type="p5.48xlarge",
        region=REGION,
        image="ami-12c6146b",
        allowed_regions=frozenset({REGION}),
        labels={"spillway-deployment": name},
    )
    await asyncio.to_thread(aws.launch, request)
    await asyncio.to_thread(aws.stop, key)
    stopped_at = time.time()
    await asyncio.to_thread(aws.set_labels, key, {"spillway-warm": str(int(stopped_at))})
    sweeper: WorkflowHandle[object, object] = host.client.get_workflow_handle(SWEEPER_ID)
    await sweeper.signal("sweep_now")

    # Past the leak grace period (1 s) it is still there: the pool owns it.
    await asyncio.sleep(4)
    assert [m["State"]["Name"] for m in ec2_instances(moto_server, REGION, key)] == ["stopped"]

    await eventually(lambda: not ec2_instances(moto_server, REGION, key), within_s=30, interval=0.2)
    assert time.time() - int(stopped_at) > 8

    async def recorded() -> bool:
        status = await sweeper.query("state", result_type=SweeperStatus)
        return any(key in line and "max_stopped_s 8" in line for line in status.terminated)

    await eventually_async(recorded, within_s=10)
