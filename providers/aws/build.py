"""Pure request building for EC2: RunInstances parameters, tags, filters, and reading results.

Nothing here talks to AWS or imports boto3, so every rule is tested without a cloud.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from providers.base import KEY_LABEL, MANAGED_LABEL, Instance, InstanceState, LaunchRequest

#: AWS tag keys (AWS allows ':' in tag keys; the ``spillway:`` prefix groups ours).
MANAGED_TAG = f"spillway:{MANAGED_LABEL.removeprefix('spillway-')}"
KEY_TAG = f"spillway:{KEY_LABEL.removeprefix('spillway-')}"
LIVE_STATES = ("pending", "running", "stopping", "stopped")

_STATES: dict[str, InstanceState] = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopped",
    "shutting-down": "terminated",
    "terminated": "terminated",
}


@dataclass(frozen=True)
class AwsNetwork:
    """Where machines go inside an account: subnet per zone, security groups, instance role."""

    #: zone -> subnet id; a zone missing here uses the default VPC's subnet.
    subnets: Mapping[str, str] = field(default_factory=dict)
    security_group_ids: Sequence[str] = ()
    instance_profile_arn: str = ""
    #: Root device of the images used (``/dev/sda1`` for Ubuntu and the Deep Learning AMIs).
    root_device_name: str = "/dev/sda1"


def client_token(key: str, zone: str) -> str:
    """EC2 ClientToken for one zone attempt (64 characters at most).

    Per zone, because EC2 refuses a token reused with other parameters
    (IdempotentParameterMismatch), and a retry in the next zone changes the placement.
    """
    return hashlib.sha256(f"{key}\x00{zone}".encode()).hexdigest()[:64]


def tags(request: LaunchRequest) -> list[dict[str, str]]:
    merged = {str(k): str(v) for k, v in request.labels.items()}
    merged.update({MANAGED_TAG: "true", KEY_TAG: request.key, "Name": f"spillway-{request.key}"})
    return [{"Key": k, "Value": v} for k, v in merged.items()]


def run_instances_params(
    request: LaunchRequest, zone: str, network: AwsNetwork | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``ec2.run_instances`` launching ``request`` in ``zone``."""
    network = network or AwsNetwork()
    params: dict[str, Any] = {
        "ImageId": request.image,
        "InstanceType": request.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": client_token(request.key, zone),
        "Placement": {"AvailabilityZone": zone},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags(request)},
            {"ResourceType": "volume", "Tags": tags(request)},
        ],
        "BlockDeviceMappings": [
            {
                "DeviceName": network.root_device_name,
                "Ebs": {
                    "VolumeSize": request.disk_gib,
                    "VolumeType": "gp3",
                    "DeleteOnTermination": True,
                },
            }
        ],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "InstanceInitiatedShutdownBehavior": "terminate",
    }
    if request.user_data:
        # boto3 base64-encodes UserData itself.
        params["UserData"] = request.user_data
    if request.spot:
        params["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            },
        }
    subnet = network.subnets.get(zone)
    if subnet:
        params["SubnetId"] = subnet
    if network.security_group_ids:
        params["SecurityGroupIds"] = list(network.security_group_ids)
    if network.instance_profile_arn:
        params["IamInstanceProfile"] = {"Arn": network.instance_profile_arn}
    return params


def key_filter(key: str) -> list[dict[str, Any]]:
    """DescribeInstances filters finding the live machine launched with ``key``."""
    return [
        {"Name": f"tag:{KEY_TAG}", "Values": [key]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
    ]


def managed_filter() -> list[dict[str, Any]]:
    return [
        {"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
    ]


def cannot_stop(raw: Mapping[str, Any]) -> str:
    """Why EC2 will not stop this instance ("" when it will)."""
    if raw.get("InstanceLifecycle") == "spot":
        return "a one-time spot instance cannot be stopped, only terminated"
    if raw.get("RootDeviceType") == "instance-store":
        return "its root device is an instance store, which does not survive a stop"
    return ""


def tag_changes(
    labels: Mapping[str, str | None],
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(tags to create, tags to delete) for ``create_tags``/``delete_tags``."""
    create = [{"Key": k, "Value": v} for k, v in labels.items() if v is not None]
    delete = [{"Key": k} for k, v in labels.items() if v is None]
    return create, delete


def to_instance(raw: Mapping[str, Any], region: str) -> Instance:
    """An :class:`Instance` from one element of EC2's ``Instances`` list."""
    labels = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
    return Instance(
        key=labels.get(KEY_TAG, ""),
        cloud="aws",
        instance_id=raw["InstanceId"],
        instance_type=raw["InstanceType"],
        region=region,
        zone=raw.get("Placement", {}).get("AvailabilityZone", ""),
        state=_STATES.get(raw.get("State", {}).get("Name", ""), "failed"),
        spot=raw.get("InstanceLifecycle") == "spot",
        labels=labels,
        private_ip=raw.get("PrivateIpAddress", ""),
        cannot_stop=cannot_stop(raw),
    )
