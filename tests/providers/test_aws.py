"""The AWS adapter against moto, in-process and as a real HTTP server reached by endpoint_url."""

from __future__ import annotations

import base64

import pytest

from providers.aws import AwsProvider
from providers.aws.build import KEY_TAG, MANAGED_TAG
from providers.base import CapacityMemory, LaunchRequest
from providers.errors import AuthError, CapacityError, QuotaError, ResidencyError
from tests.providers.conftest import Ec2

REGION = "eu-north-1"
ZONES = ("eu-north-1a", "eu-north-1b", "eu-north-1c")
IMAGE = "ami-0123456789abcdef0"


def provider(ec2: Ec2, memory: CapacityMemory) -> AwsProvider:
    return AwsProvider(
        session=ec2.session,
        endpoint_url=ec2.endpoint_url,
        memory=memory,
        regions=(REGION, "us-east-1"),
    )


def request(key: str, **kwargs: object) -> LaunchRequest:
    fields: dict[str, object] = {
        "key": key,
        "instance_type": "p5.48xlarge",
        "region": REGION,
        "image": IMAGE,
        "allowed_regions": frozenset({REGION}),
        "user_data": "#cloud-config\nruncmd: [[spillway, agent, run]]\n",
        "labels": {"deployment": "llama-70b"},
    }
    fields.update(kwargs)
    return LaunchRequest(**fields)  # type: ignore[arg-type]


def test_launch_gpu_instance_with_tags_image_and_user_data(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    aws = provider(ec2, memory)
    instance = aws.launch(request("spill-1"))
    assert (instance.instance_type, instance.region, instance.zone) == (
        "p5.48xlarge",
        REGION,
        ZONES[0],
    )
    assert instance.key == "spill-1" and not instance.spot
    client = ec2.client(REGION)
    raw = client.describe_instances(InstanceIds=[instance.instance_id])["Reservations"][0][
        "Instances"
    ][0]
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags[MANAGED_TAG] == "true" and tags[KEY_TAG] == "spill-1"
    assert tags["deployment"] == "llama-70b"
    assert raw["ImageId"] == IMAGE and raw["InstanceType"] == "p5.48xlarge"
    user_data = client.describe_instance_attribute(
        InstanceId=instance.instance_id, Attribute="userData"
    )["UserData"]["Value"]
    assert base64.b64decode(user_data).decode() == request("x").user_data


def test_spot_option_reaches_ec2(ec2: Ec2, memory: CapacityMemory) -> None:
    instance = provider(ec2, memory).launch(
        request("spot-1", instance_type="g6e.xlarge", spot=True)
    )
    assert instance.spot
    (call,) = ec2.run_instances_calls()
    assert call["InstanceMarketOptions"]["MarketType"] == "spot"


def test_relaunch_with_the_same_key_returns_the_first_instance(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    aws = provider(ec2, memory)
    first = aws.launch(request("same-key"))
    again = provider(ec2, memory).launch(request("same-key"))  # e.g. a restarted worker
    assert again.instance_id == first.instance_id
    assert len(ec2.run_instances_calls()) == 1
    assert [i.instance_id for i in aws.list_managed()] == [first.instance_id]
    described = aws.describe("same-key")
    assert described is not None and described.instance_id == first.instance_id


def test_capacity_error_fails_over_to_the_next_zone_and_is_remembered(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    ec2.fail_run_instances(
        "InsufficientInstanceCapacity",
        lambda params: params["Placement"]["AvailabilityZone"] == ZONES[0],
    )
    aws = provider(ec2, memory)
    first = aws.launch(request("cap-1"))
    assert first.zone == ZONES[1]
    assert memory.blocked("aws", "p5.48xlarge", ZONES[0])
    second = aws.launch(request("cap-2"))
    assert second.zone == ZONES[1]
    tried = [c["Placement"]["AvailabilityZone"] for c in ec2.run_instances_calls()]
    assert tried == [ZONES[0], ZONES[1], ZONES[1]]  # the second launch skipped the failed zone
    offers = aws.offers(
        __import__("providers").OfferRequest("H100-80GB", 8, allowed_regions=frozenset({REGION}))
    )
    assert [o.zones for o in offers] == [ZONES[1:]]


def test_no_capacity_anywhere_raises_one_error_and_leaves_nothing(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    ec2.fail_run_instances("InsufficientInstanceCapacity", lambda params: True)
    aws = provider(ec2, memory)
    with pytest.raises(CapacityError) as caught:
        aws.launch(request("cap-all"))
    for zone in ZONES:
        assert zone in str(caught.value)
    assert aws.list_managed() == []
    assert aws.describe("cap-all") is None
    calls = len(ec2.run_instances_calls())
    with pytest.raises(CapacityError, match="recently"):
        aws.launch(request("cap-all"))
    assert len(ec2.run_instances_calls()) == calls  # the memory answered, EC2 was not asked


def test_quota_error_stops_at_once(ec2: Ec2, memory: CapacityMemory) -> None:
    ec2.fail_run_instances("VcpuLimitExceeded", lambda params: True)
    with pytest.raises(QuotaError, match="VcpuLimitExceeded"):
        provider(ec2, memory).launch(request("quota-1"))
    assert len(ec2.run_instances_calls()) == 1
    assert not memory.blocked("aws", "p5.48xlarge", ZONES[0])


def test_terminate_twice_and_unknown_key_are_silent(ec2: Ec2, memory: CapacityMemory) -> None:
    aws = provider(ec2, memory)
    instance = aws.launch(request("term-1"))
    aws.terminate("term-1")
    aws.terminate("term-1")
    aws.terminate("never-launched")
    assert aws.describe("term-1") is None
    state = ec2.client(REGION).describe_instances(InstanceIds=[instance.instance_id])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"
    assert aws.list_managed() == []


def test_list_managed_finds_tagged_machines_in_every_region_only(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    aws = provider(ec2, memory)
    ours = [
        aws.launch(request("lm-eu")),
        aws.launch(
            request(
                "lm-us",
                region="us-east-1",
                allowed_regions=frozenset({"us-east-1"}),
                instance_type="g6.xlarge",
            )
        ),
    ]
    ec2.client(REGION).run_instances(
        ImageId=IMAGE, InstanceType="g5.xlarge", MinCount=1, MaxCount=1
    )  # someone else's machine
    assert sorted(i.instance_id for i in aws.list_managed()) == sorted(i.instance_id for i in ours)


def test_region_outside_the_lock_is_refused_before_any_call(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    aws = provider(ec2, memory)
    with pytest.raises(ResidencyError, match=r"eu-north-1.*locked to us-east-1"):
        aws.launch(request("lock-1", allowed_regions=frozenset({"us-east-1"})))
    with pytest.raises(ResidencyError, match="residency group 'eu'"):
        aws.launch(request("lock-2", residency=frozenset({"us"})))
    assert ec2.calls == []


def test_missing_credentials_is_an_auth_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, memory: CapacityMemory
) -> None:
    import boto3

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    aws = AwsProvider(
        session=boto3.Session(), endpoint_url="http://127.0.0.1:9", memory=memory, regions=[REGION]
    )
    with pytest.raises(AuthError, match=r"no usable AWS credentials.*AWS_PROFILE"):
        aws.launch(request("creds-1"))


def test_a_key_launched_in_one_region_is_not_launched_again_in_another(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    aws = provider(ec2, memory)
    first = aws.launch(request("moved-1"))
    again = aws.launch(
        request(
            "moved-1",
            region="us-east-1",
            allowed_regions=frozenset({"us-east-1"}),
        )
    )
    assert again.instance_id == first.instance_id and again.region == REGION
    assert len(ec2.run_instances_calls()) == 1


def test_unknown_region_type_or_zone_is_refused_naming_what_exists(
    ec2: Ec2, memory: CapacityMemory
) -> None:
    from providers.errors import InvalidRequestError, UnknownRegionError, UnknownSkuError

    aws = provider(ec2, memory)
    everywhere = frozenset({"eu-west-9", REGION})
    with pytest.raises(UnknownRegionError, match=r"no region 'eu-west-9'.*eu-north-1"):
        aws.launch(request("bad-1", region="eu-west-9", allowed_regions=everywhere))
    with pytest.raises(UnknownSkuError, match=r"no GPU instance type 'p9.huge'.*p5.48xlarge"):
        aws.launch(request("bad-2", instance_type="p9.huge"))
    with pytest.raises(UnknownRegionError, match=r"p4de.24xlarge in eu-north-1.*us-east-1"):
        aws.launch(request("bad-3", instance_type="p4de.24xlarge"))
    with pytest.raises(InvalidRequestError, match=r"zone eu-north-1z.*eu-north-1a"):
        aws.launch(request("bad-4", zones=("eu-north-1z",)))
    with pytest.raises(InvalidRequestError, match="names no image"):
        aws.launch(request("bad-5", image=""))
    assert ec2.calls == []
