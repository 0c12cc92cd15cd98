"""Stopping and starting machines (the warm pool's provider side) on every cloud adapter.

EC2 runs on moto (in-process and as an HTTP server), Compute Engine and Azure on the project's
fakes of their REST APIs driven by the real client libraries. For each: a stopped machine is
described as stopped and still listed, stop and start are idempotent, labels are merged and
removed, and a machine that cannot stop says why and is left as it was.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.aws import AwsProvider
from providers.azure.build import vm_name
from providers.base import CLAIM_LABEL, MANAGED_LABEL, WARM_LABEL, CapacityMemory
from providers.errors import CannotStopError, CapacityError, InvalidRequestError
from providers.gcp.build import instance_name
from providers.local import LocalProvider
from tests.conftest import SchedulerFactory, Tokens, eventually
from tests.fakes.azure_compute import FakeArm
from tests.fakes.gcp_compute import FakeCompute
from tests.providers.conftest import Ec2
from tests.providers.test_aws import REGION as AWS_REGION
from tests.providers.test_aws import request as aws_request
from tests.providers.test_azure import RG as AZ_RG
from tests.providers.test_azure import SUB as AZ_SUB
from tests.providers.test_azure import provider as azure_provider
from tests.providers.test_azure import request as azure_request
from tests.providers.test_gcp import PROJECT as GCP_PROJECT
from tests.providers.test_gcp import provider as gcp_provider
from tests.providers.test_gcp import request as gcp_request
from tests.providers.test_local import _gone
from tests.providers.test_local import request as local_request


def aws_provider(ec2: Ec2, memory: CapacityMemory) -> AwsProvider:
    return AwsProvider(
        session=ec2.session,
        endpoint_url=ec2.endpoint_url,
        memory=memory,
        regions=(AWS_REGION,),
        poll_interval_s=0.05,
    )


def ec2_state(ec2: Ec2, instance_id: str) -> str:
    raw = ec2.client(AWS_REGION).describe_instances(InstanceIds=[instance_id])
    return str(raw["Reservations"][0]["Instances"][0]["State"]["Name"])


def test_aws_stop_and_start_are_idempotent_and_keep_the_machine(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    aws = aws_provider(ec2, memory)
    launched = aws.launch(aws_request("warm-1"))
    assert launched.cannot_stop == ""

    stopped = aws.stop("warm-1")
    assert stopped is not None and stopped.state == "stopped"
    assert stopped.instance_id == launched.instance_id
    assert ec2_state(ec2, launched.instance_id) == "stopped"
    described = aws.describe("warm-1")
    assert described is not None and described.state == "stopped"
    assert [i.instance_id for i in aws.list_managed()] == [launched.instance_id]
    stops = len([c for c, _ in ec2.calls if c == "StopInstances"])
    again = aws.stop("warm-1")  # stopping a stopped machine is not an error, and no call
    assert again is not None and again.state == "stopped"
    assert len([c for c, _ in ec2.calls if c == "StopInstances"]) == stops == 1

    started = aws.start("warm-1")
    assert started is not None and started.instance_id == launched.instance_id
    assert started.state in ("pending", "running")
    assert ec2_state(ec2, launched.instance_id) in ("pending", "running")
    aws.start("warm-1")
    assert len([c for c, _ in ec2.calls if c == "StartInstances"]) == 1
    # The same machine again: relaunching the key returns it rather than a second one.
    assert aws.launch(aws_request("warm-1")).instance_id == launched.instance_id
    assert aws.stop("nothing-here") is None and aws.start("nothing-here") is None


def test_aws_labels_are_merged_and_removed(ec2: Ec2, memory: CapacityMemory) -> None:
    aws = aws_provider(ec2, memory)
    aws.launch(aws_request("warm-2"))
    aws.set_labels("warm-2", {WARM_LABEL: "1764583200", CLAIM_LABEL: "provision-x"})
    found = aws.describe("warm-2")
    assert found is not None
    assert found.label(WARM_LABEL) == "1764583200" and found.label(CLAIM_LABEL) == "provision-x"
    assert found.label("deployment") == "llama-70b"  # the launch's own labels stay
    aws.set_labels("warm-2", {WARM_LABEL: None})
    found = aws.describe("warm-2")
    assert found is not None and WARM_LABEL not in found.labels
    assert found.label(CLAIM_LABEL) == "provision-x"
    with pytest.raises(InvalidRequestError, match="spillway-key"):
        aws.set_labels("warm-2", {"spillway-key": "other"})


def test_aws_spot_machine_cannot_stop_and_keeps_running(ec2: Ec2, memory: CapacityMemory) -> None:
    aws = aws_provider(ec2, memory)
    launched = aws.launch(aws_request("warm-spot", spot=True))
    assert launched.spot and "spot" in launched.cannot_stop
    with pytest.raises(CannotStopError, match="one-time spot"):
        aws.stop("warm-spot")
    assert ec2_state(ec2, launched.instance_id) == "running"
    assert not [c for c, _ in ec2.calls if c == "StopInstances"]


def test_aws_start_without_capacity_is_a_capacity_error_and_stays_stopped(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    def hook(**_: object) -> tuple[object, dict[str, object]]:
        from botocore.awsrequest import AWSResponse

        body = {
            "Error": {"Code": "InsufficientInstanceCapacity", "Message": "no p5 capacity"},
            "ResponseMetadata": {"HTTPStatusCode": 500},
        }
        return AWSResponse("https://ec2.invalid", 500, {}, None), body

    # Registered before the adapter makes its client: clients copy the session's hooks.
    ec2.session.events.register("before-call.ec2.StartInstances", hook)
    aws = aws_provider(ec2, memory)
    launched = aws.launch(aws_request("warm-3"))
    aws.stop("warm-3")
    with pytest.raises(CapacityError):
        aws.start("warm-3")
    assert ec2_state(ec2, launched.instance_id) == "stopped"


async def test_local_stop_keeps_the_state_and_start_registers_the_agent_again(
    tmp_path: Path, tokens: Tokens, start_scheduler: SchedulerFactory
) -> None:
    scheduler = await start_scheduler()
    local = LocalProvider(
        tmp_path / "local", f"127.0.0.1:{scheduler.port}", tokens.add, residency="eu"
    )
    key = "warm-local-1"
    try:
        instance = await asyncio.to_thread(local.launch, local_request(key))
        await eventually(lambda: scheduler.fleet.get(instance.instance_id), within_s=60)
        record = scheduler.fleet.get(instance.instance_id)
        assert record is not None
        first_registration = record.registered_at
        record_file = next((tmp_path / "local").glob("*.json"))
        pid = int(json.loads(record_file.read_text())["pid"])
        # What a VM's disk would hold: the agent's state directory, and a file in it.
        state = tmp_path / "local" / "agent-state" / "spillway" / instance.instance_id
        state.mkdir(parents=True, exist_ok=True)
        (state / "weights.marker").write_text("downloaded")

        stopped = await asyncio.to_thread(local.stop, key)
        assert stopped is not None and stopped.state == "stopped"
        assert _gone(pid)
        assert (state / "weights.marker").read_text() == "downloaded"
        described = local.describe(key)
        assert described is not None and described.state == "stopped"
        assert [(i.key, i.state) for i in local.list_managed()] == [(key, "stopped")]
        assert (await asyncio.to_thread(local.stop, key)) == stopped  # idempotent
        # Launching the key again returns the stopped machine; it does not boot a second one.
        relaunched = await asyncio.to_thread(local.launch, local_request(key))
        assert relaunched.state == "stopped"

        local.set_labels(key, {WARM_LABEL: "1764583200"})
        started = await asyncio.to_thread(local.start, key)
        assert started is not None and started.state == "running"
        assert started.label(WARM_LABEL) == "1764583200"
        new_pid = int(json.loads(record_file.read_text())["pid"])
        assert new_pid != pid and not _gone(new_pid)
        assert (await asyncio.to_thread(local.start, key)) is not None  # idempotent
        assert int(json.loads(record_file.read_text())["pid"]) == new_pid

        def registered_again() -> bool:
            again = scheduler.fleet.get(instance.instance_id)
            return again is not None and again.registered_at > first_registration

        await eventually(registered_again, within_s=60, interval=0.1)
    finally:
        await asyncio.to_thread(local.terminate, key)
    assert local.describe(key) is None and local.list_managed() == []


@pytest.fixture
def gcp_fake() -> Iterator[FakeCompute]:
    compute = FakeCompute(GCP_PROJECT).start()
    try:
        yield compute
    finally:
        compute.stop()


def test_gcp_stop_goes_through_stopping_to_terminated_and_start_back_to_running(
    gcp_fake: FakeCompute, memory: CapacityMemory
) -> None:
    gcp = gcp_provider(gcp_fake, memory)
    launched = gcp.launch(gcp_request("warm-1"))
    name = instance_name("warm-1")
    zone = launched.zone
    assert gcp_fake.instances[(zone, name)]["status"] == "RUNNING"

    stopped = gcp.stop("warm-1")
    assert stopped is not None and stopped.state == "stopped"
    # GCP's TERMINATED: stopped, the instance and its disk still there.
    assert gcp_fake.instances[(zone, name)]["status"] == "TERMINATED"
    assert [op.kind for op in gcp_fake.operations.values()].count("stop") == 1
    described = gcp.describe("warm-1")
    assert described is not None and described.state == "stopped"
    assert [(i.instance_id, i.state) for i in gcp.list_managed()] == [(name, "stopped")]
    gcp.stop("warm-1")  # idempotent: no second stop call
    assert [c for c in gcp_fake.calls if c[0] == "stop"] == [("stop", zone, name)]

    started = gcp.start("warm-1")
    assert started is not None and started.state == "running"
    assert gcp_fake.instances[(zone, name)]["status"] == "RUNNING"
    gcp.start("warm-1")
    assert [c for c in gcp_fake.calls if c[0] == "start"] == [("start", zone, name)]
    assert gcp.launch(gcp_request("warm-1")).instance_id == name
    assert [c[0] for c in gcp_fake.calls].count("insert") == 1


def test_gcp_start_waits_for_a_machine_still_stopping(
    gcp_fake: FakeCompute, memory: CapacityMemory
) -> None:
    gcp = gcp_provider(gcp_fake, memory)
    launched = gcp.launch(gcp_request("warm-2"))
    name = instance_name("warm-2")
    instances, _ = gcp._make_clients()
    # A stop someone else began: its operation is still running.
    instances.stop_unary(project=GCP_PROJECT, zone=launched.zone, instance=name)
    assert gcp_fake.instances[(launched.zone, name)]["status"] == "STOPPING"
    started = gcp.start("warm-2")  # a start now would be resourceNotReady: it waits first
    assert started is not None and started.state == "running"


def test_gcp_labels_are_set_with_the_fingerprint_and_removed(
    gcp_fake: FakeCompute, memory: CapacityMemory
) -> None:
    gcp = gcp_provider(gcp_fake, memory)
    launched = gcp.launch(gcp_request("warm-3"))
    name = instance_name("warm-3")
    fingerprint = gcp_fake.instances[(launched.zone, name)]["labelFingerprint"]
    gcp.set_labels("warm-3", {WARM_LABEL: "1764583200", CLAIM_LABEL: "provision-Chat.EU-1"})
    found = gcp.describe("warm-3")
    assert found is not None
    assert found.label(WARM_LABEL) == "1764583200"
    assert found.label(CLAIM_LABEL) == "provision-chat-eu-1"  # as GCP label values must be
    assert found.label("deployment") == "llama-70b" and found.label(MANAGED_LABEL) == "true"
    assert gcp_fake.instances[(launched.zone, name)]["labelFingerprint"] != fingerprint
    gcp.set_labels("warm-3", {CLAIM_LABEL: None})
    found = gcp.describe("warm-3")
    assert found is not None and CLAIM_LABEL not in found.labels
    assert found.label(WARM_LABEL) == "1764583200"


@pytest.fixture
def arm() -> Iterator[FakeArm]:
    fake = FakeArm(AZ_SUB, AZ_RG).start()
    try:
        yield fake
    finally:
        fake.stop()


def test_azure_deallocate_and_start_through_the_power_states(
    arm: FakeArm, memory: CapacityMemory
) -> None:
    azure = azure_provider(arm, memory)
    launched = azure.launch(azure_request("warm-1"))
    name = vm_name("warm-1")
    assert launched.state == "running" and arm.power[name] == "running"

    stopped = azure.stop("warm-1")
    assert stopped is not None and stopped.state == "stopped"
    assert arm.power[name] == "deallocated"  # not merely powered off: the hardware is released
    assert name in arm.vms
    described = azure.describe("warm-1")
    assert described is not None and described.state == "stopped"
    assert [(i.key, i.state) for i in azure.list_managed()] == [("warm-1", "stopped")]
    azure.stop("warm-1")
    assert [c[0] for c in arm.calls].count("deallocate") == 1

    started = azure.start("warm-1")
    assert started is not None and started.state == "running"
    assert arm.power[name] == "running"
    azure.start("warm-1")
    assert [c[0] for c in arm.calls].count("start") == 1
    assert [c[0] for c in arm.calls].count("put") == 1


def test_azure_start_waits_for_a_deallocation_under_way(
    arm: FakeArm, memory: CapacityMemory
) -> None:
    azure = azure_provider(arm, memory)
    azure.launch(azure_request("warm-2"))
    name = vm_name("warm-2")
    vms = azure._vms()
    # A deallocation someone else began, not waited for.
    vms.begin_deallocate(AZ_RG, name, polling_interval=0, **azure._call_kwargs)
    assert arm.power[name] == "deallocating"
    assert azure.describe("warm-2") is not None
    started = azure.start("warm-2")  # a start now would be 409 Conflict: it waits first
    assert started is not None and started.state == "running"


def test_azure_tags_are_merged_and_removed_and_an_ephemeral_disk_cannot_stop(
    arm: FakeArm, memory: CapacityMemory
) -> None:
    azure = azure_provider(arm, memory)
    azure.launch(azure_request("warm-3"))
    name = vm_name("warm-3")
    azure.set_labels("warm-3", {WARM_LABEL: "1764583200", CLAIM_LABEL: "provision-x"})
    assert arm.vms[name]["tags"][WARM_LABEL] == "1764583200"
    azure.set_labels("warm-3", {CLAIM_LABEL: None})
    found = azure.describe("warm-3")
    assert found is not None and CLAIM_LABEL not in found.labels
    assert found.label(WARM_LABEL) == "1764583200" and found.label(MANAGED_LABEL) == "true"
    assert found.label("deployment") == "llama-70b"

    os_disk = arm.vms[name]["properties"]["storageProfile"]["osDisk"]
    os_disk["diffDiskSettings"] = {"option": "Local", "placement": "ResourceDisk"}
    with pytest.raises(CannotStopError, match="ephemeral OS disk"):
        azure.stop("warm-3")
    assert arm.power[name] == "running"
    assert "deallocate" not in [c[0] for c in arm.calls]
