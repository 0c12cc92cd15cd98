"""A small fake of Azure Resource Manager's virtual machine API for the real
``azure-mgmt-compute`` client.

What it models, because the adapter depends on it: PUT (create or update, by name) answered
with 201 and an ``Azure-AsyncOperation`` URL that reports InProgress for a few polls; GET, list
and DELETE (202 plus an async operation; 204 when the VM is already gone); PATCH of the tags;
POST deallocate and start (202 plus an async operation; the power state in the instance view,
``$expand=instanceView``, goes deallocating -> deallocated and starting -> running; either is a
no-op when the VM is already there, and a start while deallocating is 409 Conflict); bearer tokens
required; errors in ARM's shape, either synchronous (409 SkuNotAvailable, 409 OperationNotAllowed
for quota, 429 with Retry-After, 503) or asynchronous (AllocationFailed), after which, as in
Azure, the VM resource stays behind in provisioning state Failed until someone deletes it.
It is a test double, not an emulator: no NICs, disks, images or RBAC.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http import FakeServer, Reply, Request

_SYNC_ERRORS = {
    "SkuNotAvailable": (
        409,
        "The requested VM size {size} is currently not available in location '{location}' "
        "zones '{zone}'. Please try another size or deploy to a different location or zones.",
    ),
    "OperationNotAllowed": (
        409,
        "Operation could not be completed as it results in exceeding approved "
        "standardNDSH100v5Family Cores quota. Location: {location}, Current Limit: 0.",
    ),
    "TooManyRequests": (429, "The request is being throttled."),
    "ServiceUnavailable": (503, "The service is temporarily unavailable."),
}
_ASYNC_ERRORS = {
    "AllocationFailed": "Allocation failed. We do not have sufficient capacity for the requested "
    "VM size in this region.",
    "ZonalAllocationFailed": "Allocation failed. We do not have sufficient capacity for the "
    "requested VM size in this zone.",
}


@dataclass
class AzureFault:
    """Fail the next ``times`` PUTs (in ``zone``, or anywhere) with ``code``.

    Codes in the synchronous table fail the PUT itself; AllocationFailed and
    ZonalAllocationFailed let the PUT succeed and the async operation fail.
    """

    code: str
    zone: str | None = None
    times: int = 1


@dataclass
class _Op:
    id: str
    vm: str
    kind: str
    polls_left: int
    error: str | None = None
    status: str = "InProgress"


@dataclass
class FakeArm:
    subscription: str
    resource_group: str
    op_polls: int = 2
    server: FakeServer = field(default_factory=FakeServer)
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: VM name -> power state (the part of ``PowerState/...`` after the slash).
    power: dict[str, str] = field(default_factory=dict)
    operations: dict[str, _Op] = field(default_factory=dict)
    faults: list[AzureFault] = field(default_factory=list)
    #: (verb, VM name, zone, location) of every mutating call that reached the fake.
    calls: list[tuple[str, str, str, str]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        rg = r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
        vms = rg + r"/providers/Microsoft\.Compute/virtualMachines"
        ops = (
            r"/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Compute/locations/[^/]+/operations"
        )
        s = self.server
        s.route("PUT", vms + r"/(?P<name>[^/]+)", self._put)
        s.route("GET", vms + r"/(?P<name>[^/]+)", self._get)
        s.route("DELETE", vms + r"/(?P<name>[^/]+)", self._delete)
        s.route("PATCH", vms + r"/(?P<name>[^/]+)", self._patch)
        s.route("POST", vms + r"/(?P<name>[^/]+)/deallocate", self._deallocate)
        s.route("POST", vms + r"/(?P<name>[^/]+)/start", self._start)
        s.route("GET", vms, self._list)
        s.route("GET", ops + r"/(?P<op>[^/]+)", self._operation)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> FakeArm:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def inject(self, fault: AzureFault) -> None:
        with self.server.lock:
            self.faults.append(fault)

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _error(
        status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> Reply:
        return status, {"error": {"code": code, "message": message}}, headers or {}

    def _check(self, request: Request) -> Reply | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
            return self._error(
                401,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
            )
        if "api-version" not in request.query:
            return self._error(
                400, "MissingApiVersionParameter", "The api-version query parameter is required."
            )
        return None

    def _vm_id(self, name: str) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{name}"
        )

    def _new_op(self, vm: str, kind: str, location: str, api_version: str) -> tuple[_Op, str]:
        op = _Op(id=f"op-{next(self._ids)}", vm=vm, kind=kind, polls_left=self.op_polls)
        self.operations[op.id] = op
        url = (
            f"{self.url}/subscriptions/{self.subscription}/providers/Microsoft.Compute/locations/"
            f"{location}/operations/{op.id}?api-version={api_version}"
        )
        return op, url

    def _take_fault(self, zone: str) -> AzureFault | None:
        for fault in self.faults:
            if fault.zone in (None, zone) and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    # -- routes --------------------------------------------------------------------------------

    def _put(self, request: Request, m: re.Match[str]) -> Reply:
        refused = self._check(request)
        if refused:
            return refused
        name = m["name"]
        body = request.body or {}
        location = str(body.get("location", ""))
        zone = (body.get("zones") or [""])[0]
        size = body.get("properties", {}).get("hardwareProfile", {}).get("vmSize", "")
        self.calls.append(("put", name, zone, location))
        if name in self.vms:
            vm = self.vms[name]
            if vm["properties"]["hardwareProfile"]["vmSize"] != size:
                return self._error(
                    409, "OperationNotAllowed", f"Changing the size of {name} is not modelled."
                )
            vm["tags"] = body.get("tags", {})
            return 200, vm, {}
        fault = self._take_fault(zone)
        if fault is not None and fault.code in _SYNC_ERRORS:
            status, message = _SYNC_ERRORS[fault.code]
            headers = {"Retry-After": "0"} if status == 429 else {}
            return self._error(
                status, fault.code, message.format(size=size, location=location, zone=zone), headers
            )
        if not location or not size:
            return self._error(400, "InvalidParameter", "location and vmSize are required.")
        vm = {
            "id": self._vm_id(name),
            "name": name,
            "type": "Microsoft.Compute/virtualMachines",
            "location": location,
            "tags": body.get("tags", {}),
            "properties": {**body.get("properties", {}), "provisioningState": "Creating"},
        }
        if zone:
            vm["zones"] = [zone]
        vm["properties"]["vmId"] = f"00000000-0000-0000-0000-{next(self._ids):012d}"
        self.vms[name] = vm
        op, url = self._new_op(name, "create", location, request.query["api-version"])
        op.error = fault.code if fault is not None else None
        return 201, vm, {"Azure-AsyncOperation": url, "Retry-After": "0"}

    def _get(self, request: Request, m: re.Match[str]) -> Reply:
        refused = self._check(request)
        if refused:
            return refused
        self._tick(m["name"])
        vm = self.vms.get(m["name"])
        if vm is None:
            return self._not_found(m["name"])
        return 200, self._view(vm, request), {}

    def _not_found(self, name: str) -> Reply:
        return self._error(
            404,
            "ResourceNotFound",
            f"The Resource 'Microsoft.Compute/virtualMachines/{name}' under resource "
            f"group '{self.resource_group}' was not found.",
        )

    def _view(self, vm: dict[str, Any], request: Request) -> dict[str, Any]:
        """The VM, with its instance view when ``$expand=instanceView`` asks for it."""
        if request.query.get("$expand") != "instanceView":
            return vm
        state = str(vm["properties"].get("provisioningState", "")).lower()
        statuses = [{"code": f"ProvisioningState/{state}", "level": "Info"}]
        power = self.power.get(vm["name"])
        if power:
            statuses.append({"code": f"PowerState/{power}", "level": "Info"})
        return {**vm, "properties": {**vm["properties"], "instanceView": {"statuses": statuses}}}

    def _tick(self, name: str) -> None:
        """Reading a VM lets its running operations progress, as time does in Azure."""
        for op in list(self.operations.values()):
            if op.vm == name and op.status == "InProgress":
                op.polls_left -= 1
                if op.polls_left <= 0:
                    self._finish(op)

    def _patch(self, request: Request, m: re.Match[str]) -> Reply:
        refused = self._check(request)
        if refused:
            return refused
        name = m["name"]
        self.calls.append(("patch", name, "", self.vms.get(name, {}).get("location", "")))
        vm = self.vms.get(name)
        if vm is None:
            return self._not_found(name)
        body = request.body or {}
        if set(body) - {"tags"}:
            return self._error(400, "InvalidParameter", "Only tags updates are modelled.")
        if "tags" in body:
            vm["tags"] = dict(body["tags"] or {})
        return 200, vm, {}

    def _power_op(self, request: Request, m: re.Match[str], kind: str) -> Reply:
        refused = self._check(request)
        if refused:
            return refused
        name = m["name"]
        vm = self.vms.get(name)
        self.calls.append((kind, name, "", vm.get("location", "") if vm else ""))
        if vm is None:
            return self._not_found(name)
        power = self.power.get(name, "")
        if kind == "start" and power == "deallocating":
            return self._error(
                409,
                "Conflict",
                f"Operation 'start' is not allowed on VM '{name}' since the VM is deallocating.",
            )
        op, url = self._new_op(name, kind, vm["location"], request.query["api-version"])
        if (kind, power) in (("deallocate", "deallocated"), ("start", "running")):
            op.polls_left = 1
        else:
            self.power[name] = "deallocating" if kind == "deallocate" else "starting"
        return 202, None, {"Azure-AsyncOperation": url, "Location": url, "Retry-After": "0"}

    def _deallocate(self, request: Request, m: re.Match[str]) -> Reply:
        return self._power_op(request, m, "deallocate")

    def _start(self, request: Request, m: re.Match[str]) -> Reply:
        return self._power_op(request, m, "start")

    def _list(self, request: Request, m: re.Match[str]) -> Reply:
        refused = self._check(request)
        if refused:
            return refused
        for name in list(self.vms):
            self._tick(name)
        return 200, {"value": [self._view(vm, request) for vm in self.vms.values()]}, {}

    def _delete(self, request: Request, m: re.Match[str]) -> Reply:
        refused = self._check(request)
        if refused:
            return refused
        name = m["name"]
        self.calls.append(("delete", name, "", self.vms.get(name, {}).get("location", "")))
        vm = self.vms.get(name)
        if vm is None:
            return 204, None, {}
        vm["properties"]["provisioningState"] = "Deleting"
        _, url = self._new_op(name, "delete", vm["location"], request.query["api-version"])
        return 202, None, {"Azure-AsyncOperation": url, "Location": url, "Retry-After": "0"}

    def _operation(self, request: Request, m: re.Match[str]) -> Reply:
        op = self.operations.get(m["op"])
        if op is None:
            return self._error(404, "NotFound", f"operation {m['op']} not found")
        if op.status == "InProgress":
            op.polls_left -= 1
            if op.polls_left <= 0:
                self._finish(op)
        body: dict[str, Any] = {"name": op.id, "status": op.status}
        if op.status == "Failed" and op.error:
            body["error"] = {"code": op.error, "message": _ASYNC_ERRORS[op.error]}
        return 200, body, {"Retry-After": "0"}

    def _finish(self, op: _Op) -> None:
        vm = self.vms.get(op.vm)
        if op.kind in ("deallocate", "start"):
            op.status = "Succeeded"
            if vm is not None:
                self.power[op.vm] = "deallocated" if op.kind == "deallocate" else "running"
        elif op.kind == "delete":
            self.vms.pop(op.vm, None)
            self.power.pop(op.vm, None)
            op.status = "Succeeded"
        elif op.error:
            op.status = "Failed"
            if vm is not None:
                vm["properties"]["provisioningState"] = "Failed"  # Azure leaves it behind
        else:
            op.status = "Succeeded"
            if vm is not None:
                vm["properties"]["provisioningState"] = "Succeeded"
                self.power[op.vm] = "running"
