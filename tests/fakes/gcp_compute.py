"""A small fake of the Compute Engine REST API (v1) for the real ``google-cloud-compute`` client.

What it models, because the adapter depends on it: zonal instances insert/get/delete; stop
(STOPPING while its operation runs, then TERMINATED: the instance and its disks remain) and
start (STAGING, then RUNNING); stopping a TERMINATED or starting a RUNNING instance is a no-op
operation, starting one still STOPPING is 400 resourceNotReady; setLabels with the
labelFingerprint it checks (412 conditionNotMet on a stale one); the aggregated list with
``name = "..."`` and ``labels.K = "V"`` filters; long-running zone operations that stay RUNNING
for a few polls (of the operation, or reads of its instance); ``requestId`` deduplication (the
same id returns the same operation); ``alreadyExists`` (409) for a second instance of the same
name in a zone; errors in GCP's shape,
either on the HTTP call (429, 503, 403 quota) or inside the finished operation
(ZONE_RESOURCE_POOL_EXHAUSTED, QUOTA_EXCEEDED), after which no instance exists.
It is a test double, not an emulator: no networks, disks, images or IAM.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http import FakeServer, Reply, Request

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_FILTER = re.compile(r'^(name|labels\.[a-z0-9_-]+)\s*=\s*"([^"]*)"$')
_HTTP_REASONS = {
    429: ("rateLimitExceeded", "Rate Limit Exceeded"),
    503: ("backendError", "The service is currently unavailable."),
    403: ("quotaExceeded", "Quota 'GPUS_ALL_REGIONS' exceeded. Limit: 0.0 globally."),
}
_OP_ERRORS = {
    "ZONE_RESOURCE_POOL_EXHAUSTED": (
        503,
        "The zone '{zone}' does not have enough resources available to fulfill the request. "
        "Try a different zone, or try again later.",
    ),
    "QUOTA_EXCEEDED": (403, "Quota 'NVIDIA_H100_GPUS' exceeded.  Limit: 0.0 in region {region}."),
}


@dataclass
class Fault:
    """Make the next ``times`` inserts (in ``zone``, or anywhere) fail.

    ``http_status`` fails the HTTP call itself; ``op_error`` lets the call succeed and the
    operation finish with that error code.
    """

    zone: str | None = None
    http_status: int | None = None
    op_error: str | None = None
    times: int = 1


@dataclass
class _Operation:
    name: str
    zone: str
    kind: str
    target: str
    polls_left: int
    error: str | None = None
    status: str = "RUNNING"


@dataclass
class FakeCompute:
    project: str
    op_polls: int = 2
    server: FakeServer = field(default_factory=FakeServer)
    instances: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, _Operation] = field(default_factory=dict)
    request_ids: dict[str, str] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    #: (verb, zone, instance name) of every mutating call that reached the fake.
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def __post_init__(self) -> None:
        base = r"/compute/v1/projects/(?P<project>[^/]+)"
        zone = base + r"/zones/(?P<zone>[^/]+)"
        s = self.server
        s.route("POST", zone + r"/instances", self._insert)
        s.route("GET", zone + r"/instances/(?P<name>[^/]+)", self._get)
        s.route("DELETE", zone + r"/instances/(?P<name>[^/]+)", self._delete)
        s.route("POST", zone + r"/instances/(?P<name>[^/]+)/stop", self._stop)
        s.route("POST", zone + r"/instances/(?P<name>[^/]+)/start", self._start)
        s.route("POST", zone + r"/instances/(?P<name>[^/]+)/setLabels", self._set_labels)
        s.route("GET", zone + r"/operations/(?P<op>[^/]+)", self._get_operation)
        s.route("GET", base + r"/aggregated/instances", self._aggregated)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> FakeCompute:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def inject(self, fault: Fault) -> None:
        with self.server.lock:
            self.faults.append(fault)

    # -- helpers -------------------------------------------------------------------------------

    def _link(self, path: str) -> str:
        return f"https://www.googleapis.com/compute/v1/projects/{self.project}/{path}"

    @staticmethod
    def _error(status: int, reason: str, message: str) -> Reply:
        body = {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"domain": "global", "reason": reason, "message": message}],
            }
        }
        return status, body, {}

    def _take_fault(self, zone: str) -> Fault | None:
        for fault in self.faults:
            if fault.zone in (None, zone) and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    def _operation_json(self, op: _Operation) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(abs(hash(op.name)) % 10**12),
            "name": op.name,
            "zone": self._link(f"zones/{op.zone}"),
            "operationType": op.kind,
            "targetLink": op.target,
            "status": op.status,
            "progress": 100 if op.status == "DONE" else 0,
            "selfLink": self._link(f"zones/{op.zone}/operations/{op.name}"),
        }
        if op.status == "DONE" and op.error:
            status, message = _OP_ERRORS[op.error]
            region = op.zone.rsplit("-", 1)[0]
            body["error"] = {
                "errors": [
                    {"code": op.error, "message": message.format(zone=op.zone, region=region)}
                ]
            }
            body["httpErrorStatusCode"] = status
            body["httpErrorMessage"] = "SERVICE UNAVAILABLE" if status == 503 else "FORBIDDEN"
        return body

    def _new_operation(self, zone: str, kind: str, name: str, request_id: str) -> _Operation:
        op = _Operation(
            name=f"operation-{next(self._ids)}-{kind}",
            zone=zone,
            kind=kind,
            target=self._link(f"zones/{zone}/instances/{name}"),
            polls_left=self.op_polls,
        )
        self.operations[op.name] = op
        if request_id:
            self.request_ids[request_id] = op.name
        return op

    def _finish(self, op: _Operation) -> None:
        op.status = "DONE"
        key = (op.zone, op.target.rsplit("/", 1)[-1])
        if op.kind == "stop" and key in self.instances:
            self.instances[key]["status"] = "TERMINATED"
        elif op.kind == "start" and key in self.instances:
            self.instances[key]["status"] = "RUNNING"
        elif op.kind == "insert":
            if op.error:
                self.instances.pop(key, None)  # GCP leaves no instance after such a failure
            elif key in self.instances:
                self.instances[key]["status"] = "RUNNING"
        elif op.kind == "delete":
            self.instances.pop(key, None)

    # -- routes --------------------------------------------------------------------------------

    def _insert(self, request: Request, m: re.Match[str]) -> Reply:
        zone = m["zone"]
        body = request.body or {}
        name = str(body.get("name", ""))
        request_id = request.query.get("requestId", "")
        if request_id in self.request_ids:
            return 200, self._operation_json(self.operations[self.request_ids[request_id]]), {}
        self.calls.append(("insert", zone, name))
        fault = self._take_fault(zone)
        if fault is not None and fault.http_status is not None:
            reason, message = _HTTP_REASONS[fault.http_status]
            return self._error(fault.http_status, reason, message)
        if not _NAME.match(name):
            return self._error(
                400, "invalid", f"Invalid value for field 'resource.name': '{name}'."
            )
        machine_type = str(body.get("machineType", ""))
        if not re.match(rf"^(.*/)?zones/{re.escape(zone)}/machineTypes/[a-z0-9-]+$", machine_type):
            return self._error(
                400, "invalid", f"Invalid value for field 'resource.machineType': '{machine_type}'."
            )
        if (zone, name) in self.instances:
            return self._error(
                409,
                "alreadyExists",
                f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' already "
                "exists",
            )
        instance = dict(body)
        instance.update(
            id=str(next(self._ids)),
            status="PROVISIONING",
            zone=self._link(f"zones/{zone}"),
            machineType=self._link(machine_type[machine_type.index("zones/") :]),
            selfLink=self._link(f"zones/{zone}/instances/{name}"),
            labelFingerprint=self._fingerprint(body.get("labels") or {}),
            networkInterfaces=[
                {**nic, "networkIP": f"10.128.0.{len(self.instances) + 2}"}
                for nic in body.get("networkInterfaces", [{}])
            ],
        )
        self.instances[(zone, name)] = instance
        op = self._new_operation(zone, "insert", name, request_id)
        op.error = fault.op_error if fault is not None else None
        return 200, self._operation_json(op), {}

    @staticmethod
    def _fingerprint(labels: dict[str, str]) -> str:
        raw = json.dumps(labels, sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    def _power(self, request: Request, m: re.Match[str], kind: str) -> Reply:
        """stop and start: an operation that moves the instance through its states."""
        zone, name = m["zone"], m["name"]
        request_id = request.query.get("requestId", "")
        if request_id in self.request_ids:
            return 200, self._operation_json(self.operations[self.request_ids[request_id]]), {}
        self.calls.append((kind, zone, name))
        instance = self.instances.get((zone, name))
        if instance is None:
            return self._not_found(zone, name)
        status = instance["status"]
        op = self._new_operation(zone, kind, name, request_id)
        if kind == "start" and status == "STOPPING":
            del self.operations[op.name]
            return self._error(
                400,
                "resourceNotReady",
                f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' is not "
                "ready",
            )
        noop = (kind == "stop" and status == "TERMINATED") or (
            kind == "start" and status == "RUNNING"
        )
        if noop:
            op.polls_left = 1
        else:
            instance["status"] = "STOPPING" if kind == "stop" else "STAGING"
        return 200, self._operation_json(op), {}

    def _stop(self, request: Request, m: re.Match[str]) -> Reply:
        return self._power(request, m, "stop")

    def _start(self, request: Request, m: re.Match[str]) -> Reply:
        return self._power(request, m, "start")

    def _set_labels(self, request: Request, m: re.Match[str]) -> Reply:
        zone, name = m["zone"], m["name"]
        self.calls.append(("setLabels", zone, name))
        instance = self.instances.get((zone, name))
        if instance is None:
            return self._not_found(zone, name)
        body = request.body or {}
        if body.get("labelFingerprint") != instance.get("labelFingerprint"):
            return self._error(
                412,
                "conditionNotMet",
                "Labels fingerprint either invalid or resource labels have changed",
            )
        labels = dict(body.get("labels") or {})
        instance["labels"] = labels
        instance["labelFingerprint"] = self._fingerprint(labels)
        op = self._new_operation(zone, "setLabels", name, request.query.get("requestId", ""))
        op.polls_left = 1
        return 200, self._operation_json(op), {}

    def _tick(self, zone: str, name: str | None) -> None:
        """Reading an instance lets its running operations progress, as time does in GCP."""
        for op in list(self.operations.values()):
            if op.status == "DONE" or (name is not None and op.zone != zone):
                continue
            if name is not None and op.target.rsplit("/", 1)[-1] != name:
                continue
            op.polls_left -= 1
            if op.polls_left <= 0:
                self._finish(op)

    def _get(self, request: Request, m: re.Match[str]) -> Reply:
        self._tick(m["zone"], m["name"])
        instance = self.instances.get((m["zone"], m["name"]))
        if instance is None:
            return self._not_found(m["zone"], m["name"])
        return 200, instance, {}

    def _not_found(self, zone: str, name: str) -> Reply:
        return self._error(
            404,
            "notFound",
            f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' was not found",
        )

    def _delete(self, request: Request, m: re.Match[str]) -> Reply:
        zone, name = m["zone"], m["name"]
        request_id = request.query.get("requestId", "")
        if request_id in self.request_ids:
            return 200, self._operation_json(self.operations[self.request_ids[request_id]]), {}
        self.calls.append(("delete", zone, name))
        instance = self.instances.get((zone, name))
        if instance is None:
            return self._not_found(zone, name)
        instance["status"] = "STOPPING"
        return 200, self._operation_json(self._new_operation(zone, "delete", name, request_id)), {}

    def _get_operation(self, request: Request, m: re.Match[str]) -> Reply:
        op = self.operations.get(m["op"])
        if op is None or op.zone != m["zone"]:
            return self._error(404, "notFound", f"The resource operation '{m['op']}' was not found")
        if op.status != "DONE":
            op.polls_left -= 1
            if op.polls_left <= 0:
                self._finish(op)
        return 200, self._operation_json(op), {}

    def _aggregated(self, request: Request, m: re.Match[str]) -> Reply:
        expression = request.query.get("filter", "").strip()
        field_name, value = "", ""
        if expression:
            match = _FILTER.match(expression)
            if match is None:
                return self._error(
                    400, "invalid", f"Invalid list filter expression '{expression}'."
                )
            field_name, value = match.group(1), match.group(2)
        self._tick("", None)
        items: dict[str, Any] = {}
        for (zone, name), instance in sorted(self.instances.items()):
            if field_name == "name" and name != value:
                continue
            if field_name.startswith("labels."):
                label = field_name.removeprefix("labels.")
                if instance.get("labels", {}).get(label) != value:
                    continue
            items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(instance)
        return 200, {"kind": "compute#instanceAggregatedList", "id": "agg", "items": items}, {}
