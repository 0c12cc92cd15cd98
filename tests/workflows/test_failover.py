"""Provision failover across offers and clouds, and compensation when a later step fails.

The provision workflow runs on a real Temporal dev server with the real adapters: EC2 on a real
moto server (RunInstances answered with InsufficientInstanceCapacity by a botocore hook), and
the GCP and Azure clients against the project's fakes of their REST APIs (quota and allocation
errors injected there).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from google.auth.credentials import AnonymousCredentials
from temporalio.client import Client
from temporalio.worker import Worker

from decisions.plantypes import OfferChoice, ReplicaTemplate, Timeouts
from providers.aws.adapter import AwsProvider
from providers.azure import AzureProvider
from providers.base import CapacityMemory, Provider
from providers.catalog import default_catalog
from providers.gcp.adapter import GcpProvider
from scheduler.config import SpillSettings
from scheduler.fleet import FleetState
from scheduler.policystore import PolicyStore
from spillway.serve.control_plane import WORKFLOWS
from tests.conftest import write_yaml
from tests.fakes.azure_compute import AzureFault, FakeArm
from tests.fakes.gcp_compute import FakeCompute, Fault
from tests.providers.test_azure import NETWORK, RG, SUB, StaticToken
from tests.workflows.conftest import ec2_instances
from workflows.activities import ControlActivities, ControlPlane
from workflows.types import ProvisionInput, ProvisionResult

PROJECT = "spillway-test"
AWS = OfferChoice("aws", "p5.48xlarge", "eu-north-1", ["eu-north-1a", "eu-north-1b"], 57.79)
GCP = OfferChoice("gcp", "a3-highgpu-8g", "europe-west4", ["europe-west4-a"], 97.08)
AZURE = OfferChoice("azure", "Standard_ND96isr_H100_v5", "swedencentral", ["1"], 103.24)


def policy(name: str) -> dict[str, Any]:
    return {
        "credentials": {
            "aws": {"env": ["AWS_ACCESS_KEY_ID"]},
            "gcp": {"file": "/nonexistent/sa.json", "project": PROJECT},
            "azure": {"env": ["AZURE_CLIENT_ID"], "subscription_id": SUB},
        },
        "deployments": {
            name: {
                "model": "chat",
                "weights": "/models/chat",
                "sku": "H100-80GB",
                "gpus": 8,
                "max_replicas": 4,
                "autoscaling": {"target": 4},
                "spillover": {
                    "enabled": True,
                    "providers": ["aws", "gcp", "azure"],
                    "residency": "eu",
                    "max_spilled_replicas": 3,
                },
            }
        },
    }


@pytest.fixture
def gcp_fake() -> Iterator[FakeCompute]:
    fake = FakeCompute(PROJECT).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def azure_fake() -> Iterator[FakeArm]:
    fake = FakeArm(SUB, RG).start()
    try:
        yield fake
    finally:
        fake.stop()


class Clouds:
    def __init__(self, moto_server: str, gcp: FakeCompute, azure: FakeArm) -> None:
        self.moto_server = moto_server
        self.gcp = gcp
        self.azure = azure
        self.memory = CapacityMemory(ttl_s=600)
        self.session = boto3.Session()
        self.run_instances = 0

        def no_capacity(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
            self.run_instances += 1
            body = {
                "Error": {"Code": "InsufficientInstanceCapacity", "Message": "no p5 capacity"},
                "ResponseMetadata": {"HTTPStatusCode": 500},
            }
            return AWSResponse("https://ec2.invalid", 500, {}, None), body

        self.session.events.register("before-call.ec2.RunInstances", no_capacity)

    def providers(self) -> dict[str, Provider]:
        return {
            "aws": AwsProvider(
                memory=self.memory, session=self.session, endpoint_url=self.moto_server
            ),
            "gcp": GcpProvider(
                PROJECT,
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                api_endpoint=self.gcp.url,
                memory=self.memory,
                poll_interval_s=0.01,
            ),
            "azure": AzureProvider(
                SUB,
                RG,
                NETWORK,
                credential=StaticToken(),
                base_url=self.azure.url,
                allow_http=True,
                memory=self.memory,
                poll_interval_s=0.01,
                client_kwargs={"retry_total": 0},
            ),
        }


@pytest.fixture
async def provision(
    tmp_path: Path,
    temporal_address: str,
    moto_server: str,
    aws_credentials: None,
    gcp_fake: FakeCompute,
    azure_fake: FakeArm,
) -> AsyncIterator[tuple[Client, str, Clouds, str]]:
    name = f"chat-{uuid.uuid4().hex[:6]}"
    store = PolicyStore(write_yaml(tmp_path / "policy.yaml", policy(name)))
    store.load()
    clouds = Clouds(moto_server, gcp_fake, azure_fake)
    plane = ControlPlane(
        fleet=FleetState(0.25, 4, 12),
        policies=store,
        catalog=default_catalog(),
        providers=clouds.providers(),
        settings=SpillSettings(),
        decide_every_s=0.25,
        memory=clouds.memory,
        images={
            "aws": "ami-12c6146b",
            "gcp": "projects/my-images/global/images/family/spillway-gpu",
            "azure": "Canonical:ubuntu-24_04-lts:server:latest",
        },
    )
    client = await Client.connect(temporal_address)
    queue = f"failover-{uuid.uuid4().hex[:6]}"
    async with Worker(
        client,
        task_queue=queue,
        workflows=WORKFLOWS,
        activities=ControlActivities(plane).all(),
    ):
        yield client, queue, clouds, name


async def test_capacity_and_quota_errors_move_to_the_next_offer_then_compensate(
    provision: tuple[Client, str, Clouds, str],
) -> None:
    client, queue, clouds, name = provision
    clouds.gcp.inject(Fault(http_status=403, times=5))  # quota, before anything is created
    clouds.azure.inject(AzureFault("ZonalAllocationFailed", zone="1"))  # one zone, then none
    workflow_id = f"provision-{name}-{uuid.uuid4().hex[:6]}"
    azure_second = OfferChoice(
        "azure", "Standard_ND96isr_H100_v5", "swedencentral", ["1", "2"], 103.24
    )
    started = time.monotonic()
    result = await client.execute_workflow(
        "provision",
        ProvisionInput(
            parent_id="",
            replica_id=f"{name}-r1",
            template=ReplicaTemplate(name, "chat", "/models/chat", "sglang", [], "H100-80GB", 8),
            where="cloud",
            offers=[AWS, GCP, azure_second],
            timeouts=Timeouts(register_s=2, heartbeat_s=5),
        ),
        id=workflow_id,
        task_queue=queue,
        result_type=ProvisionResult,
    )
    assert not result.ok
    attempts = result.attempts
    assert (
        attempts[0].startswith("aws p5.48xlarge in eu-north-1") and "CapacityError" in attempts[0]
    )
    assert (
        attempts[1].startswith("gcp a3-highgpu-8g in europe-west4") and "QuotaError" in attempts[1]
    )
    assert attempts[2].startswith("azure Standard_ND96isr_H100_v5 in swedencentral")
    assert "launched" in attempts[2]
    assert "AgentNeverRegistered" in attempts[3] and "terminating" in attempts[3]
    assert "AgentNeverRegistered" in result.error
    # Every zone of the first offer was tried once, then remembered as without capacity.
    assert clouds.run_instances == 2
    assert clouds.memory.blocked("aws", "p5.48xlarge", "eu-north-1a")
    assert clouds.memory.blocked("azure", "Standard_ND96isr_H100_v5", "1")
    # The machine that launched (in Azure zone 2) was terminated by the compensation; nothing
    # was left anywhere.
    assert result.cloud == "azure" and result.key == f"{workflow_id}.2"
    puts = [c for c in clouds.azure.calls if c[0] == "put"]
    assert [c[2] for c in puts] == ["1", "2"]
    assert [c[0] for c in clouds.azure.calls].count("delete") >= 1
    assert clouds.azure.vms == {}
    assert clouds.gcp.instances == {}
    assert ec2_instances(clouds.moto_server, "eu-north-1", workflow_id) == []
    assert time.monotonic() - started < 60


async def test_every_offer_failing_ends_with_nothing_launched(
    provision: tuple[Client, str, Clouds, str],
) -> None:
    client, queue, clouds, name = provision
    clouds.gcp.inject(Fault(op_error="ZONE_RESOURCE_POOL_EXHAUSTED", times=5))
    result = await client.execute_workflow(
        "provision",
        ProvisionInput(
            parent_id="",
            replica_id=f"{name}-r2",
            template=ReplicaTemplate(name, "chat", "/models/chat", "sglang", [], "H100-80GB", 8),
            where="cloud",
            offers=[AWS, GCP],
            timeouts=Timeouts(register_s=2, heartbeat_s=5),
        ),
        id=f"provision-{name}-{uuid.uuid4().hex[:6]}",
        task_queue=queue,
        result_type=ProvisionResult,
    )
    assert not result.ok
    assert result.error == "none of 2 offers could be launched"
    assert [a.split(":")[0] for a in result.attempts] == [AWS.describe(), GCP.describe()]
    assert all("CapacityError" in a for a in result.attempts)
    assert result.key == ""
    assert clouds.gcp.instances == {}
