"""Request building and shared rules, as pure functions: no cloud, no SDK call."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers.aws.build import AwsNetwork, client_token, run_instances_params
from providers.azure.build import AzureNetwork, image_reference, vm_body, vm_name
from providers.base import CapacityMemory, LaunchRequest, resource_name
from providers.errors import InvalidRequestError
from providers.gcp.build import instance_body, instance_name, labels, request_id

KEYS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", fullmatch=True)
GCP_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def request(**kwargs: object) -> LaunchRequest:
    fields: dict[str, object] = {
        "key": "deploy/llama:spill-7".replace("/", "-"),
        "instance_type": "p5.48xlarge",
        "region": "us-east-1",
        "image": "ami-0abc",
        "allowed_regions": frozenset({"us-east-1"}),
    }
    fields.update(kwargs)
    return LaunchRequest(**fields)  # type: ignore[arg-type]


@settings(database=None)
@given(KEYS, KEYS)
def test_names_are_stable_valid_and_distinct(a: str, b: str) -> None:
    assert instance_name(a) == instance_name(a)
    assert GCP_NAME.match(instance_name(a))
    assert len(vm_name(a)) <= 64 and len(instance_name(a)) <= 63
    if a != b:
        assert resource_name(a) != resource_name(b)
        assert request_id(a, "z") != request_id(b, "z")


def test_aws_params_carry_image_zone_token_tags_and_spot() -> None:
    on_demand = run_instances_params(request(user_data="#!/bin/sh\n"), "us-east-1b")
    assert on_demand["ImageId"] == "ami-0abc"
    assert on_demand["Placement"] == {"AvailabilityZone": "us-east-1b"}
    assert on_demand["UserData"] == "#!/bin/sh\n"
    assert "InstanceMarketOptions" not in on_demand and "SubnetId" not in on_demand
    spot = run_instances_params(
        request(spot=True), "us-east-1c", AwsNetwork(subnets={"us-east-1c": "subnet-1"})
    )
    assert spot["InstanceMarketOptions"]["MarketType"] == "spot"
    assert spot["SubnetId"] == "subnet-1"
    assert client_token("k", "us-east-1b") != client_token("k", "us-east-1c")
    assert len(client_token("k" * 128, "z")) <= 64
    tags = {t["Key"]: t["Value"] for t in on_demand["TagSpecifications"][0]["Tags"]}
    assert tags["spillway:managed"] == "true" and tags["spillway:key"] == request().key


def test_gcp_body_boot_payload_spot_and_labels() -> None:
    cloud_init = instance_body(
        request(instance_type="a3-highgpu-8g", user_data="#cloud-config\n", spot=True),
        "us-central1-a",
    )
    items = {i["key"]: i["value"] for i in cloud_init["metadata"]["items"]}
    assert items["user-data"] == "#cloud-config\n" and items["spillway-key"] == request().key
    assert cloud_init["machine_type"] == "zones/us-central1-a/machineTypes/a3-highgpu-8g"
    assert cloud_init["scheduling"]["provisioning_model"] == "SPOT"
    assert cloud_init["scheduling"]["on_host_maintenance"] == "TERMINATE"
    assert cloud_init["disks"][0]["initialize_params"]["source_image"] == "ami-0abc"
    script = instance_body(request(user_data="#!/bin/sh\necho hi\n"), "us-central1-a")
    assert {i["key"] for i in script["metadata"]["items"]} == {"spillway-key", "startup-script"}
    assert labels(request(labels={"Team": "ML Infra"}))["team"] == "ml-infra"


def test_azure_body_image_forms_custom_data_and_zone() -> None:
    network = AzureNetwork(subnet_id="/subscriptions/s/.../subnets/a", admin_ssh_public_key="k")
    body = vm_body(
        request(image="Canonical:ubuntu-24_04-lts:server:latest", user_data="#cloud-config\n"),
        "",
        network,
    )
    assert "zones" not in body
    props = body["properties"]
    assert base64.b64decode(props["osProfile"]["customData"]) == b"#cloud-config\n"
    assert props["storageProfile"]["imageReference"]["publisher"] == "Canonical"
    assert "priority" not in props
    assert image_reference("/subscriptions/s/images/x") == {"id": "/subscriptions/s/images/x"}
    with pytest.raises(InvalidRequestError, match="neither an image resource id"):
        image_reference("ubuntu")


def test_capacity_memory_expires_after_its_ttl() -> None:
    now = [100.0]
    memory = CapacityMemory(ttl_s=60, clock=lambda: now[0])
    memory.mark("aws", "p5.48xlarge", "us-east-1a")
    assert memory.blocked("aws", "p5.48xlarge", "us-east-1a")
    assert not memory.blocked("aws", "p5.48xlarge", "us-east-1b")
    assert not memory.blocked("gcp", "p5.48xlarge", "us-east-1a")
    now[0] += 59
    assert memory.blocked("aws", "p5.48xlarge", "us-east-1a")
    now[0] += 1
    assert not memory.blocked("aws", "p5.48xlarge", "us-east-1a")
