"""Pure request building for Azure Compute: VM names, the VM body (ARM JSON), image references.

The body is the JSON Azure Resource Manager takes for ``PUT .../virtualMachines/{name}``; the
SDK accepts it as is. Nothing here talks to Azure or imports the SDK.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from providers.base import KEY_LABEL, MANAGED_LABEL, InstanceState, LaunchRequest, resource_name
from providers.errors import InvalidRequestError

#: The network API version that lets a VM create (and delete) its own NIC.
NETWORK_API_VERSION = "2022-11-01"

_STATES: dict[str, InstanceState] = {
    "Creating": "pending",
    "Updating": "pending",
    "Migrating": "pending",
    "Succeeded": "running",
    "Deleting": "stopping",
    "Failed": "failed",
    "Canceled": "failed",
}
#: Power states of a provisioned VM. ``stopped`` is powered off but still allocated (and
#: billed); ``deallocated`` releases the hardware.
_POWER: dict[str, InstanceState] = {
    "starting": "pending",
    "running": "running",
    "stopping": "stopping",
    "deallocating": "stopping",
    "stopped": "stopped",
    "deallocated": "stopped",
}


@dataclass(frozen=True)
class AzureNetwork:
    """Where VMs go: the subnet (full resource id) and how to log in (SSH key only)."""

    subnet_id: str
    admin_ssh_public_key: str
    admin_username: str = "spillway"
    accelerated_networking: bool = True


def vm_name(key: str) -> str:
    """Azure VM names: 1-64 characters; the same key always gives the same name."""
    return resource_name(key, 64)


def image_reference(image: str) -> dict[str, str]:
    """An ``imageReference`` from a resource id or ``publisher:offer:sku:version``."""
    if image.startswith("/subscriptions/") or image.startswith("/communityGalleries/"):
        return {"id": image}
    parts = image.split(":")
    if len(parts) == 4 and all(parts):
        publisher, offer, sku, version = parts
        return {"publisher": publisher, "offer": offer, "sku": sku, "version": version}
    raise InvalidRequestError(
        f"azure: image {image!r} is neither an image resource id (/subscriptions/...) nor "
        "publisher:offer:sku:version",
        cloud="azure",
    )


def tags(request: LaunchRequest) -> dict[str, str]:
    merged = {str(k): str(v) for k, v in request.labels.items()}
    merged.update({MANAGED_LABEL: "true", KEY_LABEL: request.key})
    return merged


def vm_body(request: LaunchRequest, zone: str, network: AzureNetwork) -> dict[str, Any]:
    """The VM resource for ``request`` in ``zone`` ("" for a region without zones)."""
    name = vm_name(request.key)
    os_profile: dict[str, Any] = {
        "computerName": name,
        "adminUsername": network.admin_username,
        "linuxConfiguration": {
            "disablePasswordAuthentication": True,
            "ssh": {
                "publicKeys": [
                    {
                        "path": f"/home/{network.admin_username}/.ssh/authorized_keys",
                        "keyData": network.admin_ssh_public_key,
                    }
                ]
            },
        },
    }
    if request.user_data:
        os_profile["customData"] = base64.b64encode(request.user_data.encode()).decode()
    properties: dict[str, Any] = {
        "hardwareProfile": {"vmSize": request.instance_type},
        "storageProfile": {
            "imageReference": image_reference(request.image),
            "osDisk": {
                "createOption": "FromImage",
                "deleteOption": "Delete",
                "diskSizeGB": request.disk_gib,
                "managedDisk": {"storageAccountType": "Premium_LRS"},
            },
        },
        "osProfile": os_profile,
        "networkProfile": {
            "networkApiVersion": NETWORK_API_VERSION,
            "networkInterfaceConfigurations": [
                {
                    "name": f"{name}-nic",
                    "properties": {
                        "primary": True,
                        "deleteOption": "Delete",
                        "enableAcceleratedNetworking": network.accelerated_networking,
                        "ipConfigurations": [
                            {
                                "name": "ipconfig1",
                                "properties": {"subnet": {"id": network.subnet_id}},
                            }
                        ],
                    },
                }
            ],
        },
    }
    if request.spot:
        properties.update(priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -1})
    body: dict[str, Any] = {
        "location": request.region,
        "tags": tags(request),
        "properties": properties,
    }
    if zone:
        body["zones"] = [zone]
    return body


def state_of(provisioning_state: str, power_state: str = "") -> InstanceState:
    """The state from the provisioning state and, once provisioned, the power state (the part
    of the instance view's ``PowerState/...`` code after the slash)."""
    state = _STATES.get(provisioning_state, "failed")
    if state != "running" or not power_state:
        return state
    return _POWER.get(power_state, state)


def power_state(properties: Mapping[str, Any]) -> str:
    """``deallocated`` from an instance view status ``PowerState/deallocated`` ("" if none)."""
    view = properties.get("instanceView") or {}
    for status in view.get("statuses") or ():
        code = str(status.get("code", ""))
        if code.startswith("PowerState/"):
            return code.removeprefix("PowerState/")
    return ""


def cannot_stop(properties: Mapping[str, Any]) -> str:
    """Why Azure will not deallocate this VM ("" when it will)."""
    os_disk = properties.get("storageProfile", {}).get("osDisk", {})
    if os_disk.get("diffDiskSettings"):
        return "a VM with an ephemeral OS disk cannot be deallocated, only deleted"
    return ""


def is_managed(tags_: Mapping[str, str] | None) -> bool:
    return bool(tags_) and (tags_ or {}).get(MANAGED_LABEL) == "true"
