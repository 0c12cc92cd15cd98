"""The warm pool's activities under retries, against EC2 on a real moto server.

``release_machine`` and ``start_warm_machine`` may run twice for one step (a worker dies after
the cloud call, before Temporal records the result). Run again, each must find what the first
run did: the same stop, the same claimed machine, and a release retried after another provision
took the machine must leave it alone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from temporalio.testing import ActivityEnvironment

from providers.aws import AwsProvider
from providers.base import CLAIM_LABEL, WARM_LABEL, LaunchRequest
from providers.catalog import default_catalog
from scheduler.config import SpillSettings
from scheduler.fleet import FleetState
from scheduler.policystore import PolicyStore
from tests.conftest import write_yaml
from tests.workflows.test_spill import spill_policy
from workflows.activities import ControlActivities, ControlPlane
from workflows.types import (
    ReleaseMachineInput,
    ReleaseMachineOutput,
    WarmStartInput,
    WarmStartOutput,
)

REGION = "eu-north-1"


class Env:
    def __init__(self, tmp_path: Path, moto_server: str, **spillover: Any) -> None:
        self.name = f"chat-{uuid.uuid4().hex[:6]}"
        self.moto_server = moto_server
        self.session = boto3.Session()
        self.starts: list[str] = []
        self.no_capacity = False
        self.session.events.register("provide-client-params.ec2.StartInstances", self._record)
        self.session.events.register("before-call.ec2.StartInstances", self._start_hook)
        policy = spill_policy(self.name, "reserved", "/models/chat", **spillover)
        store = PolicyStore(write_yaml(tmp_path / "policy.yaml", policy))
        store.load()
        self.aws = AwsProvider(
            session=self.session,
            endpoint_url=moto_server,
            regions=(REGION,),
            poll_interval_s=0.05,
        )
        plane = ControlPlane(
            fleet=FleetState(0.25, 4, 12),
            policies=store,
            catalog=default_catalog(),
            providers={"aws": self.aws},
            settings=SpillSettings(),
            decide_every_s=0.25,
        )
        self.activities = ControlActivities(plane)

    def _record(self, params: dict[str, Any], **_: Any) -> None:
        self.starts.extend(params.get("InstanceIds", []))

    def _start_hook(self, **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if not self.no_capacity:
            return None
        body = {
            "Error": {"Code": "InsufficientInstanceCapacity", "Message": "no p5 capacity"},
            "ResponseMetadata": {"HTTPStatusCode": 500},
        }
        return AWSResponse("https://ec2.invalid", 500, {}, None), body

    def launch(self, replica_id: str) -> str:
        key = f"provision-{replica_id}.0"
        self.aws.launch(
            LaunchRequest(
                key=key,
                instance_type="p5.48xlarge",
                region=REGION,
                image="ami-12c6146b",
                allowed_regions=frozenset({REGION}),
                labels={"spillway-deployment": self.name},
            )
        )
        return key

    async def release(self, replica_id: str, key: str, since: float) -> ReleaseMachineOutput:
        out: ReleaseMachineOutput = await ActivityEnvironment().run(
            self.activities.release_machine,
            ReleaseMachineInput("aws", key, self.name, replica_id, since, "test"),
        )
        return out

    async def take(self, claim: str) -> WarmStartOutput:
        out: WarmStartOutput = await ActivityEnvironment().run(
            self.activities.start_warm_machine, WarmStartInput(self.name, claim)
        )
        return out

    def state(self, key: str) -> tuple[str, dict[str, str]]:
        found = self.aws.describe(key)
        assert found is not None
        return found.state, dict(found.labels)


@pytest.fixture
def env(tmp_path: Path, moto_server: str, aws_credentials: None) -> Iterator[Env]:
    environment = Env(
        tmp_path, moto_server, release="stop", warm_pool={"max_machines": 1, "max_stopped_s": 600}
    )
    yield environment
    for instance in environment.aws.list_managed():
        environment.aws.terminate(instance.key)


async def test_a_retried_release_and_a_retried_claim_find_what_the_first_did(env: Env) -> None:
    key = await asyncio.to_thread(env.launch, "r1")
    since = time.time()
    first = await env.release("r1", key, since)
    assert (first.stopped, first.terminated) == (True, False), first
    state, labels = env.state(key)
    assert state == "stopped" and labels[WARM_LABEL] == str(int(since))
    again = await env.release("r1", key, since)  # the retry: still stopped, nothing else
    assert (again.stopped, again.terminated) == (True, False)

    taken = await env.take("provision-r2")
    assert taken.machine is not None and taken.machine.key == key
    assert taken.usd_per_hour > 0 and "started warm machine" in taken.note
    state, labels = env.state(key)
    assert state in ("pending", "running") and labels[CLAIM_LABEL] == "provision-r2"
    assert WARM_LABEL not in labels
    retried = await env.take("provision-r2")  # the retry: the same machine, not started again
    assert retried.machine is not None and retried.machine.key == key
    assert len(env.starts) == 1

    # The first release, retried once more now: the machine is r2's; it is left alone.
    late = await env.release("r1", key, since)
    assert (late.stopped, late.terminated) == (False, False) and "left as it is" in late.outcome
    assert env.state(key)[0] in ("pending", "running")
    # Nothing else is warm: the next provision launches.
    assert (await env.take("provision-r3")).machine is None

    # r2's own release stops it into the pool again.
    back = await env.release("r2", key, since + 60)
    assert back.stopped and env.state(key)[0] == "stopped"


async def test_a_full_pool_terminates_and_a_machine_that_cannot_start_goes_back(
    env: Env,
) -> None:
    first = await asyncio.to_thread(env.launch, "f1")
    second = await asyncio.to_thread(env.launch, "f2")
    assert (await env.release("f1", first, time.time())).stopped
    full = await env.release("f2", second, time.time())
    assert full.terminated and not full.stopped
    assert "warm pool" in full.outcome and "full (1 of 1" in full.outcome
    assert env.aws.describe(second) is None

    env.no_capacity = True
    taken = await env.take("provision-f3")
    assert taken.machine is None and "did not start" in taken.note
    state, labels = env.state(first)
    assert state == "stopped" and WARM_LABEL in labels and CLAIM_LABEL not in labels
    env.no_capacity = False
    taken = await env.take("provision-f4")
    assert taken.machine is not None and taken.machine.key == first


async def test_release_terminate_terminates_and_says_why(
    tmp_path: Path, moto_server: str, aws_credentials: None
) -> None:
    env = Env(tmp_path, moto_server)  # release: terminate (the default)
    key = await asyncio.to_thread(env.launch, "t1")
    out = await env.release("t1", key, time.time())
    assert out.terminated and not out.stopped
    assert out.outcome == f"machine terminated: {env.name} releases with terminate"
    assert env.aws.describe(key) is None
    assert (await env.take("provision-t2")).machine is None
