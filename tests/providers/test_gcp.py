"""The GCP adapter: the real google-cloud-compute client against the project's fake of the API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.auth.credentials import AnonymousCredentials

from providers.base import MANAGED_LABEL, CapacityMemory, LaunchRequest
from providers.errors import AuthError, CapacityError, QuotaError, ResidencyError, TransientError
from providers.gcp import GcpProvider
from providers.gcp.build import instance_name
from tests.fakes.gcp_compute import FakeCompute, Fault

PROJECT = "spillway-test"
REGION = "europe-west4"
ZONES = ("europe-west4-a", "europe-west4-b", "europe-west4-c")


@pytest.fixture
def fake() -> Iterator[FakeCompute]:
    compute = FakeCompute(PROJECT).start()
    try:
        yield compute
    finally:
        compute.stop()


def provider(fake: FakeCompute, memory: CapacityMemory) -> GcpProvider:
    return GcpProvider(
        PROJECT,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        api_endpoint=fake.url,
        memory=memory,
        poll_interval_s=0.01,
    )


def request(key: str, **kwargs: object) -> LaunchRequest:
    fields: dict[str, object] = {
        "key": key,
        "instance_type": "a3-highgpu-8g",
        "region": REGION,
        "image": "projects/my-images/global/images/family/spillway-gpu",
        "allowed_regions": frozenset({REGION}),
        "user_data": "#cloud-config\nruncmd: [[spillway, agent, run]]\n",
        "labels": {"deployment": "Llama-70B"},
    }
    fields.update(kwargs)
    return LaunchRequest(**fields)  # type: ignore[arg-type]


def test_launch_waits_for_the_operation_and_carries_the_boot_payload(
    fake: FakeCompute, memory: CapacityMemory
) -> None:
    instance = provider(fake, memory).launch(request("spill-1", spot=True))
    assert (instance.zone, instance.region, instance.instance_type) == (
        ZONES[0],
        REGION,
        "a3-highgpu-8g",
    )
    assert instance.state == "running" and instance.spot and instance.key == "spill-1"
    stored = fake.instances[(ZONES[0], instance_name("spill-1"))]
    assert stored["labels"][MANAGED_LABEL] == "true"
    assert stored["labels"]["deployment"] == "llama-70b"
    items = {i["key"]: i["value"] for i in stored["metadata"]["items"]}
    assert items["user-data"] == request("x").user_data
    assert stored["disks"][0]["initializeParams"]["sourceImage"] == request("x").image
    assert stored["scheduling"]["provisioningModel"] == "SPOT"
    assert all(op.status == "DONE" for op in fake.operations.values())


def test_relaunch_with_the_same_key_creates_one_instance(
    fake: FakeCompute, memory: CapacityMemory
) -> None:
    first = provider(fake, memory).launch(request("same-key"))
    again = provider(fake, memory).launch(request("same-key"))
    assert again.instance_id == first.instance_id
    assert [c[0] for c in fake.calls] == ["insert"]
    assert len(fake.instances) == 1


def test_already_exists_returns_the_existing_instance(
    fake: FakeCompute, memory: CapacityMemory
) -> None:
    gcp = provider(fake, memory)
    first = gcp.launch(request("exists-1"))
    # A launch that lost its first answer: the lookup misses (another project view, a race),
    # the insert then meets alreadyExists and must return the machine instead of failing.
    gcp._search = lambda filter_, context: []  # type: ignore[method-assign]
    again = gcp.launch(request("exists-1", zones=(ZONES[0],)))
    assert again.instance_id == first.instance_id
    assert len(fake.instances) == 1


def test_capacity_in_one_zone_fails_over_and_is_remembered(
    fake: FakeCompute, memory: CapacityMemory
) -> None:
    fake.inject(Fault(zone=ZONES[0], op_error="ZONE_RESOURCE_POOL_EXHAUSTED"))
    gcp = provider(fake, memory)
    instance = gcp.launch(request("cap-1"))
    assert instance.zone == ZONES[1]
    assert memory.blocked("gcp", "a3-highgpu-8g", ZONES[0])
    assert list(fake.instances) == [(ZONES[1], instance_name("cap-1"))]
    gcp.launch(request("cap-2"))
    assert [c[1] for c in fake.calls] == [ZONES[0], ZONES[1], ZONES[1]]


def test_quota_error_in_the_operation_is_a_quota_error_and_leaves_nothing(
    fake: FakeCompute, memory: CapacityMemory
) -> None:
    fake.inject(Fault(op_error="QUOTA_EXCEEDED"))
    with pytest.raises(QuotaError, match="QUOTA_EXCEEDED"):
        provider(fake, memory).launch(request("quota-1"))
    assert fake.instances == {}
    assert len(fake.calls) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_throttling_and_unavailable_are_transient_and_a_retry_launches_once(
    fake: FakeCompute, memory: CapacityMemory, status: int
) -> None:
    fake.inject(Fault(http_status=status))
    gcp = provider(fake, memory)
    with pytest.raises(TransientError):
        gcp.launch(request("flaky-1"))
    assert fake.instances == {}
    assert not memory.blocked("gcp", "a3-highgpu-8g", ZONES[0])
    instance = gcp.launch(request("flaky-1"))
    assert instance.zone == ZONES[0]
    assert len(fake.instances) == 1


def test_no_capacity_in_any_zone(fake: FakeCompute, memory: CapacityMemory) -> None:
    fake.inject(Fault(op_error="ZONE_RESOURCE_POOL_EXHAUSTED", times=3))
    with pytest.raises(CapacityError) as caught:
        provider(fake, memory).launch(request("cap-all"))
    assert all(zone in str(caught.value) for zone in ZONES)
    assert fake.instances == {}


def test_terminate_twice_and_list_managed(fake: FakeCompute, memory: CapacityMemory) -> None:
    gcp = provider(fake, memory)
    gcp.launch(request("t-1"))
    gcp.launch(
        request(
            "t-2",
            instance_type="g2-standard-4",
            region="europe-west1",
            allowed_regions=frozenset({"europe-west1"}),
        )
    )
    assert sorted(i.key for i in gcp.list_managed()) == ["t-1", "t-2"]
    gcp.terminate("t-1")
    gcp.terminate("t-1")
    gcp.terminate("never-launched")
    assert gcp.describe("t-1") is None
    assert [i.key for i in gcp.list_managed()] == ["t-2"]


def test_region_outside_the_lock_makes_no_call(fake: FakeCompute, memory: CapacityMemory) -> None:
    with pytest.raises(ResidencyError):
        provider(fake, memory).launch(request("lock-1", allowed_regions=frozenset({"us-central1"})))
    assert fake.calls == []


def test_missing_credentials_is_an_auth_error(
    monkeypatch: pytest.MonkeyPatch, fake: FakeCompute, memory: CapacityMemory
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    gcp = GcpProvider(PROJECT, api_endpoint=fake.url, memory=memory)
    with pytest.raises(AuthError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        gcp.launch(request("creds-1"))
    assert fake.calls == []


def test_two_workers_launching_the_same_key_at_once_make_one_instance(
    fake: FakeCompute, memory: CapacityMemory
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    workers = [provider(fake, memory), provider(fake, memory)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda gcp: gcp.launch(request("race-1")), workers))
    assert results[0].instance_id == results[1].instance_id
    assert len(fake.instances) == 1
