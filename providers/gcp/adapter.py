"""The Google Compute Engine adapter: launch, find, terminate, list, stop and start Spillway's GPU
machines.

Idempotency: the instance name is derived from the key and every insert carries a ``requestId``
derived from key and zone, so a retried call is deduplicated by GCP; an ``alreadyExists`` answer
returns the existing machine. Operations are polled with a zone-operations client built with the
same endpoint, credentials and transport as the instances client. ``google-cloud-compute`` is
imported only when the adapter makes its clients.

This module must not decide where to launch and must not call GCP before the region-lock guard.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from providers.base import (
    CapacityMemory,
    Instance,
    LaunchRequest,
    Provider,
    check_labels,
    wait_for_state,
)
from providers.catalog import Catalog
from providers.errors import (
    AuthError,
    CannotStopError,
    ProviderError,
    TransientError,
    make_error,
)
from providers.gcp.build import (
    KEY_METADATA,
    GcpNetwork,
    instance_body,
    instance_name,
    label_value,
    last_segment,
    managed_filter,
    metadata_value,
    name_filter,
    request_id,
    state_of,
)

T = TypeVar("T")


def _api_error(exc: Exception, context: str) -> ProviderError:
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if isinstance(exc, auth_exc.DefaultCredentialsError):
        return AuthError(
            f"gcp: {context}: no usable Google credentials ({exc}); set "
            "GOOGLE_APPLICATION_CREDENTIALS or run with a service account",
            cloud="gcp",
        )
    if isinstance(exc, auth_exc.GoogleAuthError):
        return AuthError(f"gcp: {context}: {exc}", cloud="gcp")
    if isinstance(exc, gexc.GoogleAPICallError):
        reason = ""
        for error in exc.errors or ():
            if isinstance(error, dict) and error.get("reason"):
                reason = str(error["reason"])
                break
        status = exc.code if isinstance(exc.code, int) else None
        return make_error("gcp", reason or (exc.reason or ""), exc.message, status, context)
    if isinstance(exc, gexc.RetryError | ConnectionError | TimeoutError):
        return TransientError(f"gcp: {context}: {exc}", cloud="gcp")
    return ProviderError(f"gcp: {context}: {type(exc).__name__}: {exc}", cloud="gcp")


def _is_already_exists(exc: Exception) -> bool:
    from google.api_core import exceptions as gexc

    if not isinstance(exc, gexc.Conflict):
        return False
    return any(isinstance(e, dict) and e.get("reason") == "alreadyExists" for e in exc.errors or ())


class GcpProvider(Provider):
    """Compute Engine in one project.

    ``api_endpoint`` points the clients elsewhere (a test double, a private endpoint);
    ``credentials`` default to Application Default Credentials.
    """

    cloud = "gcp"

    def __init__(
        self,
        project: str,
        *,
        catalog: Catalog | None = None,
        memory: CapacityMemory | None = None,
        credentials: Any = None,
        api_endpoint: str | None = None,
        network: GcpNetwork | None = None,
        poll_interval_s: float = 2.0,
        operation_timeout_s: float = 900.0,
    ) -> None:
        super().__init__(catalog, memory)
        self.project = project
        self.network = network or GcpNetwork()
        self._credentials = credentials
        self._api_endpoint = api_endpoint
        self._poll_interval_s = poll_interval_s
        self._operation_timeout_s = operation_timeout_s
        self._clients: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------

    def _make_clients(self) -> tuple[Any, Any]:
        from google.api_core.client_options import ClientOptions
        from google.cloud import compute_v1

        with self._lock:
            if self._clients is None:
                credentials = self._credentials
                if credentials is None:
                    import google.auth

                    credentials, _ = google.auth.default()
                options = (
                    ClientOptions(api_endpoint=self._api_endpoint) if self._api_endpoint else None
                )
                kwargs: dict[str, Any] = {
                    "credentials": credentials,
                    "transport": "rest",
                    "client_options": options,
                }
                # The operations client is ours, with the same endpoint: the one the instances
                # client would build for polling always talks to the public endpoint.
                self._clients = (
                    compute_v1.InstancesClient(**kwargs),
                    compute_v1.ZoneOperationsClient(**kwargs),
                )
            return self._clients

    def _call(self, context: str, func: Callable[[], T]) -> T:
        try:
            return func()
        except ProviderError:
            raise
        except Exception as exc:
            raise _api_error(exc, context) from exc

    def _clients_or_error(self, context: str) -> tuple[Any, Any]:
        return self._call(context, self._make_clients)

    def _wait(self, zone: str, operation: Any, context: str) -> None:
        """Poll a zone operation until DONE; raise the mapped error if it failed."""
        from google.cloud import compute_v1

        _, operations = self._clients_or_error(context)
        deadline = time.monotonic() + self._operation_timeout_s
        done = compute_v1.Operation.Status.DONE
        while operation.status != done:
            if time.monotonic() > deadline:
                raise TransientError(
                    f"gcp: {context}: operation {operation.name} not done after "
                    f"{self._operation_timeout_s:.0f}s",
                    cloud="gcp",
                )
            time.sleep(self._poll_interval_s)
            name = operation.name
            operation = self._call(
                context,
                lambda: operations.get(project=self.project, zone=zone, operation=name),  # noqa: B023
            )
        errors = list(operation.error.errors) if operation.error else []
        if errors:
            first = errors[0]
            status = operation.http_error_status_code or None
            raise make_error("gcp", first.code, first.message, status, context)

    def _to_instance(self, raw: Any) -> Instance:
        zone = last_segment(raw.zone)
        return Instance(
            key=metadata_value(
                [{"key": i.key, "value": i.value} for i in raw.metadata.items], KEY_METADATA
            ),
            cloud="gcp",
            instance_id=raw.name,
            instance_type=last_segment(raw.machine_type),
            region=zone.rsplit("-", 1)[0],
            zone=zone,
            state=state_of(raw.status),
            spot=raw.scheduling.provisioning_model == "SPOT",
            labels=dict(raw.labels),
            private_ip=raw.network_interfaces[0].network_i_p if raw.network_interfaces else "",
        )

    def _search(self, filter_: str, context: str) -> list[Instance]:
        from google.cloud import compute_v1

        instances, _ = self._clients_or_error(context)
        request = compute_v1.AggregatedListInstancesRequest(project=self.project, filter=filter_)

        def collect() -> list[Instance]:
            found: list[Instance] = []
            for _, scoped in instances.aggregated_list(request=request):
                found.extend(self._to_instance(raw) for raw in scoped.instances)
            return found

        return self._call(context, collect)

    def _get(self, zone: str, name: str) -> Instance | None:
        from google.api_core import exceptions as gexc

        instances, _ = self._clients_or_error(f"get {name}")
        try:
            raw = instances.get(project=self.project, zone=zone, instance=name)
        except gexc.NotFound:
            return None
        except Exception as exc:
            raise _api_error(exc, f"get {name} in {zone}") from exc
        return self._to_instance(raw)

    def _delete(self, zone: str, name: str, key: str) -> None:
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1

        instances, _ = self._clients_or_error(f"delete {name}")
        context = f"delete {name} in {zone}"
        try:
            operation = instances.delete_unary(
                request=compute_v1.DeleteInstanceRequest(
                    project=self.project,
                    zone=zone,
                    instance=name,
                    request_id=request_id(key, zone, "delete"),
                )
            )
        except gexc.NotFound:
            return
        except Exception as exc:
            raise _api_error(exc, context) from exc
        self._wait(zone, operation, context)

    # -- the contract --------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Instance:
        from google.cloud import compute_v1

        zones = self.check_request(request)
        name = instance_name(request.key)
        existing = self._search(name_filter(name), f"find {name}")
        if existing:
            return existing[0]
        instances, _ = self._clients_or_error(f"launch {name}")

        def attempt(zone: str) -> Instance:
            context = f"insert {request.instance_type} as {name} in {zone}"
            body = compute_v1.Instance(instance_body(request, zone, self.network))
            try:
                operation = instances.insert_unary(
                    request=compute_v1.InsertInstanceRequest(
                        project=self.project,
                        zone=zone,
                        instance_resource=body,
                        request_id=request_id(request.key, zone),
                    )
                )
            except Exception as exc:
                if _is_already_exists(exc):
                    found = self._get(zone, name)
                    if found is not None:
                        return found
                raise _api_error(exc, context) from exc
            try:
                self._wait(zone, operation, context)
            except ProviderError:
                # A failed insert must leave nothing behind, whatever state GCP left.
                if self._get(zone, name) is not None:
                    self._delete(zone, name, request.key)
                raise
            found = self._get(zone, name)
            if found is None:
                raise ProviderError(f"gcp: {context}: done, but the instance is gone", cloud="gcp")
            return found

        return self.failover(request, zones, attempt)

    def describe(self, key: str) -> Instance | None:
        name = instance_name(key)
        found = self._search(name_filter(name), f"find {name}")
        return found[0] if found else None

    def terminate(self, key: str) -> None:
        name = instance_name(key)
        for instance in self._search(name_filter(name), f"find {name}"):
            self._delete(instance.zone, name, key)

    def list_managed(self) -> list[Instance]:
        return self._search(managed_filter(), "list managed instances")

    # -- the warm pool -------------------------------------------------------------------------

    def _settle(self, key: str, wanted: tuple[str, ...], what: str) -> Instance | None:
        return wait_for_state(
            lambda: self.describe(key),
            wanted,
            timeout_s=self._operation_timeout_s,
            poll_s=self._poll_interval_s,
            what=f"gcp: {what} {instance_name(key)}",
        )

    def _power(self, instance: Instance, verb: str) -> None:
        """instances.stop or instances.start, waiting for the operation."""
        from google.cloud import compute_v1

        instances, _ = self._clients_or_error(f"{verb} {instance.instance_id}")
        context = f"{verb} {instance.instance_id} in {instance.zone}"
        if verb == "stop":
            # The weights live on the boot disk, which a stop keeps; a local SSD's contents
            # cannot be kept by a stop on every machine type, so they are discarded.
            stop = compute_v1.StopInstanceRequest(
                project=self.project,
                zone=instance.zone,
                instance=instance.instance_id,
                discard_local_ssd=True,
            )
            operation = self._call(context, lambda: instances.stop_unary(request=stop))
        else:
            start = compute_v1.StartInstanceRequest(
                project=self.project, zone=instance.zone, instance=instance.instance_id
            )
            operation = self._call(context, lambda: instances.start_unary(request=start))
        self._wait(instance.zone, operation, context)

    def stop(self, key: str) -> Instance | None:
        instance = self.describe(key)
        if instance is None:
            return None
        if instance.cannot_stop:
            raise CannotStopError(
                f"gcp: {instance.instance_id} cannot be stopped: {instance.cannot_stop}",
                cloud="gcp",
            )
        if instance.state == "pending":
            instance = self._settle(key, ("running", "stopped"), "waiting to stop")
        if instance is None or instance.state == "stopped":
            return instance
        if instance.state == "running":
            self._power(instance, "stop")
        return self._settle(key, ("stopped",), "stopping")

    def start(self, key: str) -> Instance | None:
        instance = self.describe(key)
        if instance is None or instance.state in ("pending", "running"):
            return instance
        if instance.state == "stopping":
            instance = self._settle(key, ("stopped", "running"), "waiting to start")
            if instance is None or instance.state != "stopped":
                return instance
        self._power(instance, "start")
        return self.describe(key)

    def set_labels(self, key: str, labels: Mapping[str, str | None]) -> None:
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1

        check_labels("gcp", labels)
        instance = self.describe(key)
        if instance is None:
            return
        instances, _ = self._clients_or_error(f"set labels on {instance.instance_id}")
        context = f"setLabels on {instance.instance_id} in {instance.zone}"
        for attempt in range(3):
            raw = self._call(
                context,
                lambda: instances.get(
                    project=self.project, zone=instance.zone, instance=instance.instance_id
                ),
            )
            merged = dict(raw.labels)
            for name, value in labels.items():
                if value is None:
                    merged.pop(label_value(name), None)
                else:
                    merged[label_value(name)] = label_value(value)
            body = compute_v1.InstancesSetLabelsRequest(
                labels=merged, label_fingerprint=raw.label_fingerprint
            )
            try:
                operation = instances.set_labels_unary(
                    request=compute_v1.SetLabelsInstanceRequest(
                        project=self.project,
                        zone=instance.zone,
                        instance=instance.instance_id,
                        instances_set_labels_request_resource=body,
                    )
                )
            except gexc.PreconditionFailed:
                if attempt == 2:
                    raise TransientError(
                        f"gcp: {context}: the labels kept changing under us", cloud="gcp"
                    ) from None
                continue  # labels changed since they were read: read them again
            except Exception as exc:
                raise _api_error(exc, context) from exc
            self._wait(instance.zone, operation, context)
            return
