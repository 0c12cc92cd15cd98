"""The Azure adapter: the real azure-mgmt-compute client against the project's fake of ARM."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.credentials import AccessToken

from providers.azure import AzureNetwork, AzureProvider
from providers.azure.build import vm_name
from providers.base import KEY_LABEL, MANAGED_LABEL, CapacityMemory, LaunchRequest
from providers.errors import AuthError, CapacityError, QuotaError, ResidencyError, TransientError
from tests.fakes.azure_compute import AzureFault, FakeArm

SUB = "00000000-0000-0000-0000-00000000cafe"
RG = "spillway-gpus"
REGION = "swedencentral"
NETWORK = AzureNetwork(
    subnet_id=f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/"
    "virtualNetworks/spillway/subnets/gpus",
    admin_ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests spillway",
)


class StaticToken:
    """A credential handing out a fixed bearer token, as a test double for Entra ID."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("test-token", int(time.time()) + 3600)


@pytest.fixture
def fake() -> Iterator[FakeArm]:
    arm = FakeArm(SUB, RG).start()
    try:
        yield arm
    finally:
        arm.stop()


def provider(fake: FakeArm, memory: CapacityMemory, credential: Any = None) -> AzureProvider:
    return AzureProvider(
        SUB,
        RG,
        NETWORK,
        credential=credential or StaticToken(),
        base_url=fake.url,
        allow_http=True,
        memory=memory,
        poll_interval_s=0.01,
        client_kwargs={"retry_total": 0},
    )


def request(key: str, **kwargs: object) -> LaunchRequest:
    fields: dict[str, object] = {
        "key": key,
        "instance_type": "Standard_ND96isr_H100_v5",
        "region": REGION,
        "image": "microsoft-dsvm:ubuntu-hpc:2204:latest",
        "allowed_regions": frozenset({REGION}),
        "user_data": "#cloud-config\nruncmd: [[spillway, agent, run]]\n",
        "labels": {"deployment": "llama-70b"},
    }
    fields.update(kwargs)
    return LaunchRequest(**fields)  # type: ignore[arg-type]


def test_launch_puts_the_vm_and_waits_for_the_async_operation(
    fake: FakeArm, memory: CapacityMemory
) -> None:
    instance = provider(fake, memory).launch(request("spill-1", spot=True))
    assert (instance.region, instance.zone, instance.state) == (REGION, "1", "running")
    assert instance.key == "spill-1" and instance.spot
    vm = fake.vms[vm_name("spill-1")]
    assert vm["tags"][MANAGED_LABEL] == "true" and vm["tags"][KEY_LABEL] == "spill-1"
    props = vm["properties"]
    assert props["hardwareProfile"]["vmSize"] == "Standard_ND96isr_H100_v5"
    assert props["storageProfile"]["imageReference"]["offer"] == "ubuntu-hpc"
    assert base64.b64decode(props["osProfile"]["customData"]).decode() == request("x").user_data
    assert props["priority"] == "Spot" and props["evictionPolicy"] == "Delete"
    assert all(op.status == "Succeeded" for op in fake.operations.values())


def test_relaunch_with_the_same_key_puts_once(fake: FakeArm, memory: CapacityMemory) -> None:
    first = provider(fake, memory).launch(request("same-key"))
    again = provider(fake, memory).launch(request("same-key"))
    assert again.instance_id == first.instance_id
    assert [c[0] for c in fake.calls] == ["put"]


def test_allocation_failure_deletes_the_failed_vm_and_fails_over(
    fake: FakeArm, memory: CapacityMemory
) -> None:
    fake.inject(AzureFault("AllocationFailed", zone="1"))
    instance = provider(fake, memory).launch(request("cap-1"))
    assert instance.zone == "2" and instance.state == "running"
    assert [c[0] for c in fake.calls] == ["put", "delete", "put"]
    assert memory.blocked("azure", "Standard_ND96isr_H100_v5", "1")
    assert list(fake.vms) == [vm_name("cap-1")]


def test_sku_not_available_everywhere_is_a_capacity_error_leaving_nothing(
    fake: FakeArm, memory: CapacityMemory
) -> None:
    fake.inject(AzureFault("SkuNotAvailable", times=3))
    with pytest.raises(CapacityError, match="SkuNotAvailable"):
        provider(fake, memory).launch(request("cap-all"))
    assert fake.vms == {}
    assert [c[2] for c in fake.calls] == ["1", "2", "3"]


def test_allocation_failure_in_every_zone_leaves_nothing(
    fake: FakeArm, memory: CapacityMemory
) -> None:
    fake.inject(AzureFault("ZonalAllocationFailed", times=3))
    with pytest.raises(CapacityError):
        provider(fake, memory).launch(request("alloc-all"))
    assert fake.vms == {}


def test_quota_operation_not_allowed_is_a_quota_error(
    fake: FakeArm, memory: CapacityMemory
) -> None:
    fake.inject(AzureFault("OperationNotAllowed"))
    with pytest.raises(QuotaError, match="quota"):
        provider(fake, memory).launch(request("quota-1"))
    assert len(fake.calls) == 1 and fake.vms == {}


@pytest.mark.parametrize("code", ["TooManyRequests", "ServiceUnavailable"])
def test_throttling_is_transient_and_a_retry_creates_one_vm(
    fake: FakeArm, memory: CapacityMemory, code: str
) -> None:
    fake.inject(AzureFault(code))
    azure = provider(fake, memory)
    with pytest.raises(TransientError):
        azure.launch(request("flaky-1"))
    assert fake.vms == {}
    azure.launch(request("flaky-1"))
    assert len(fake.vms) == 1


def test_terminate_twice_and_list_managed(fake: FakeArm, memory: CapacityMemory) -> None:
    azure = provider(fake, memory)
    azure.launch(request("t-1"))
    azure.launch(request("t-2", instance_type="Standard_NC24ads_A100_v4"))
    fake.vms["someone-elses"] = {
        "name": "someone-elses",
        "location": REGION,
        "tags": {},
        "properties": {"provisioningState": "Succeeded"},
    }
    assert sorted(i.key for i in azure.list_managed()) == ["t-1", "t-2"]
    azure.terminate("t-1")
    azure.terminate("t-1")
    azure.terminate("never-launched")
    assert azure.describe("t-1") is None
    assert [i.key for i in azure.list_managed()] == ["t-2"]


def test_region_outside_the_lock_makes_no_call(fake: FakeArm, memory: CapacityMemory) -> None:
    with pytest.raises(ResidencyError, match="locked to eastus"):
        provider(fake, memory).launch(request("lock-1", allowed_regions=frozenset({"eastus"})))
    assert fake.calls == []


def test_missing_credentials_is_an_auth_error(
    monkeypatch: pytest.MonkeyPatch, fake: FakeArm, memory: CapacityMemory
) -> None:
    from azure.identity import EnvironmentCredential

    for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    azure = provider(fake, memory, credential=EnvironmentCredential())
    with pytest.raises(AuthError, match="AZURE_CLIENT_ID"):
        azure.launch(request("creds-1"))
    assert fake.calls == []
