"""Property: whatever is asked, no adapter calls a launch API outside the allowed regions.

Random requests (any instance type, any region of the cloud or one it does not have, random
allowed-region sets and residency groups, spot or not) go to the real adapters; every launch
call that reaches AWS (moto), GCP or Azure (the fakes) is recorded where the cloud sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from google.auth.credentials import AnonymousCredentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.aws import AwsProvider
from providers.azure import AzureNetwork, AzureProvider
from providers.base import CapacityMemory, LaunchRequest, Provider
from providers.catalog import default_catalog
from providers.errors import ProviderError, ResidencyError
from providers.gcp import GcpProvider
from providers.local import LocalProvider
from tests.fakes.azure_compute import FakeArm
from tests.fakes.gcp_compute import FakeCompute
from tests.providers.test_azure import StaticToken

CATALOG = default_catalog()
GROUPS = sorted({r.residency for c in CATALOG.clouds.values() for r in c.regions.values()})
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def launches(draw: st.DrawFn, cloud: str) -> LaunchRequest:
    data = CATALOG.cloud(cloud)
    regions = sorted(data.regions)
    itype = draw(st.sampled_from(sorted(data.instance_types)))
    sellers = sorted(data.instance_types[itype].prices)
    region = draw(st.sampled_from(sellers + regions + ["nowhere-1"]))
    allowed = draw(
        st.frozensets(st.sampled_from(regions), max_size=6)
        | st.just(frozenset({region}))
        | st.frozensets(st.sampled_from(sellers), min_size=1, max_size=3)
    )
    return LaunchRequest(
        key=draw(st.from_regex(r"[a-z0-9][a-z0-9-]{0,40}", fullmatch=True)),
        instance_type=itype,
        region=region,
        image="/subscriptions/s/images/gpu" if cloud == "azure" else "image-1",
        allowed_regions=allowed,
        residency=draw(st.frozensets(st.sampled_from(GROUPS), max_size=2)),
        spot=draw(st.booleans()),
    )


def _allowed(request: LaunchRequest, cloud: str, region: str) -> bool:
    if region not in request.allowed_regions:
        return False
    if request.residency:
        return CATALOG.region(cloud, region).residency in request.residency
    return True


def check(
    provider: Provider, request: LaunchRequest, launched: Callable[[], list[str]], cloud: str
) -> None:
    """Launch; then every region ``launched()`` reports (new since the call) must be allowed."""
    before = len(launched())
    try:
        provider.launch(request)
    except ResidencyError:
        assert len(launched()) == before, "a refused launch reached the cloud"
        assert not _allowed(request, cloud, request.region)
        return
    except ProviderError:
        pass
    for region in launched()[before:]:
        assert _allowed(request, cloud, region), (region, request)


@pytest.fixture
def aws_env(aws_credentials: None) -> Iterator[tuple[AwsProvider, list[str]]]:
    from moto import mock_aws

    with mock_aws():
        session = boto3.Session()
        calls: list[str] = []

        def record(context: dict[str, Any], **_: Any) -> None:
            calls.append(context["client_region"])

        session.events.register("before-call.ec2.RunInstances", record)
        yield AwsProvider(session=session, memory=CapacityMemory(), regions=["us-east-1"]), calls


@SETTINGS
@given(request=launches("aws"))
def test_aws_never_launches_outside_the_lock(
    aws_env: tuple[AwsProvider, list[str]], request: LaunchRequest
) -> None:
    provider, calls = aws_env
    check(provider, request, lambda: calls, "aws")


@pytest.fixture
def gcp_env() -> Iterator[tuple[GcpProvider, FakeCompute]]:
    fake = FakeCompute("p", op_polls=1).start()
    try:
        provider = GcpProvider(
            "p",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            api_endpoint=fake.url,
            memory=CapacityMemory(),
            poll_interval_s=0.0,
        )
        yield provider, fake
    finally:
        fake.stop()


@SETTINGS
@given(request=launches("gcp"))
def test_gcp_never_launches_outside_the_lock(
    gcp_env: tuple[GcpProvider, FakeCompute], request: LaunchRequest
) -> None:
    provider, fake = gcp_env

    def inserted() -> list[str]:
        return [zone.rsplit("-", 1)[0] for verb, zone, _ in fake.calls if verb == "insert"]

    check(provider, request, inserted, "gcp")


@pytest.fixture
def azure_env() -> Iterator[tuple[AzureProvider, FakeArm]]:
    fake = FakeArm("s", "rg", op_polls=1).start()
    try:
        provider = AzureProvider(
            "s",
            "rg",
            AzureNetwork(subnet_id="/subscriptions/s/subnets/a", admin_ssh_public_key="k"),
            credential=StaticToken(),
            base_url=fake.url,
            allow_http=True,
            memory=CapacityMemory(),
            poll_interval_s=0.0,
            client_kwargs={"retry_total": 0},
        )
        yield provider, fake
    finally:
        fake.stop()


@SETTINGS
@given(request=launches("azure"))
def test_azure_never_launches_outside_the_lock(
    azure_env: tuple[AzureProvider, FakeArm], request: LaunchRequest
) -> None:
    provider, fake = azure_env

    def put() -> list[str]:
        return [location for verb, _, _, location in fake.calls if verb == "put"]

    check(provider, request, put, "azure")


@SETTINGS
@given(allowed=st.frozensets(st.sampled_from(["local", "eu-local", "us-east-1"]), max_size=2))
def test_local_never_starts_an_agent_outside_the_lock(
    tmp_path: Path, allowed: frozenset[str]
) -> None:
    local = LocalProvider(tmp_path, "127.0.0.1:1", lambda agent_id: "t", region="eu-local")
    request = LaunchRequest("k", "L4:1", "us-east-1", "local", allowed_regions=allowed)
    with pytest.raises(ProviderError):
        local.launch(request)
    assert local.list_managed() == []
