"""Pure request building for Compute Engine: instance bodies, names, request ids, filters.

The instance body is a plain dict in the field names of ``google.cloud.compute_v1.Instance``
(snake_case), so it is tested without the SDK. Nothing here talks to GCP.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from providers.base import KEY_LABEL, MANAGED_LABEL, InstanceState, LaunchRequest, key_digest
from providers.base import resource_name as _resource_name

_NAMESPACE = uuid.UUID("6f1c3a4e-5a52-4d0b-9a63-6c1e5e0f5a11")
#: Metadata item carrying the full idempotency key (label values are too restricted for it).
KEY_METADATA = "spillway-key"
_LABEL_VALUE = re.compile(r"[^a-z0-9_-]")

_STATES: dict[str, InstanceState] = {
    "PROVISIONING": "pending",
    "STAGING": "pending",
    "RUNNING": "running",
    "REPAIRING": "running",
    "STOPPING": "stopping",
    "SUSPENDING": "stopping",
    "SUSPENDED": "stopped",
    # GCP's TERMINATED is a stopped machine that still exists (and keeps its disk).
    "TERMINATED": "stopped",
}


@dataclass(frozen=True)
class GcpNetwork:
    network: str = "global/networks/default"
    #: ``regions/{region}/subnetworks/NAME``; ``{region}`` is filled in. Empty: auto-mode subnet.
    subnetwork: str = ""
    service_account: str = ""
    external_ip: bool = False
    network_tags: Sequence[str] = ()


def instance_name(key: str) -> str:
    return _resource_name(key, 63)


def request_id(key: str, zone: str, action: str = "insert") -> str:
    """The ``requestId`` GCP deduplicates a call by: one per (key, zone, action)."""
    return str(uuid.uuid5(_NAMESPACE, f"{action}/{key}/{zone}"))


def label_value(value: str) -> str:
    return _LABEL_VALUE.sub("-", value.lower())[:63]


def labels(request: LaunchRequest) -> dict[str, str]:
    merged = {label_value(k): label_value(v) for k, v in request.labels.items()}
    merged.update({MANAGED_LABEL: "true", KEY_LABEL: key_digest(request.key)})
    return merged


def instance_body(
    request: LaunchRequest, zone: str, network: GcpNetwork | None = None
) -> dict[str, Any]:
    """An ``Instance`` resource (snake_case dict) for ``instances.insert`` in ``zone``."""
    network = network or GcpNetwork()
    interface: dict[str, Any] = {"network": network.network}
    if network.subnetwork:
        interface["subnetwork"] = network.subnetwork.format(region=request.region)
    if network.external_ip:
        interface["access_configs"] = [{"name": "external-nat", "type_": "ONE_TO_ONE_NAT"}]
    items = [{"key": KEY_METADATA, "value": request.key}]
    if request.user_data:
        # cloud-init reads user-data; anything else runs as the startup script.
        boot_key = (
            "user-data" if request.user_data.startswith("#cloud-config") else "startup-script"
        )
        items.append({"key": boot_key, "value": request.user_data})
    scheduling: dict[str, Any] = {"on_host_maintenance": "TERMINATE", "automatic_restart": False}
    if request.spot:
        scheduling.update(provisioning_model="SPOT", instance_termination_action="DELETE")
    else:
        scheduling.update(provisioning_model="STANDARD")
    body: dict[str, Any] = {
        "name": instance_name(request.key),
        "machine_type": f"zones/{zone}/machineTypes/{request.instance_type}",
        "labels": labels(request),
        "metadata": {"items": items},
        "scheduling": scheduling,
        "disks": [
            {
                "boot": True,
                "auto_delete": True,
                "initialize_params": {
                    "source_image": request.image,
                    "disk_size_gb": request.disk_gib,
                    "disk_type": f"zones/{zone}/diskTypes/pd-ssd",
                },
            }
        ],
        "network_interfaces": [interface],
    }
    if network.service_account:
        body["service_accounts"] = [
            {
                "email": network.service_account,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            }
        ]
    if network.network_tags:
        body["tags"] = {"items": list(network.network_tags)}
    return body


def name_filter(name: str) -> str:
    return f'name = "{name}"'


def managed_filter() -> str:
    return f'labels.{MANAGED_LABEL} = "true"'


def state_of(status: str) -> InstanceState:
    return _STATES.get(status, "failed")


def last_segment(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def metadata_value(items: Sequence[Mapping[str, Any]], key: str) -> str:
    for item in items:
        if item.get("key") == key:
            return str(item.get("value", ""))
    return ""
