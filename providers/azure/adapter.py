"""The Azure adapter: launch, find, terminate, list, deallocate and start Spillway's GPU VMs in
one resource group.

Idempotency: the VM name is derived from the key and creation is a PUT, so a repeated launch
addresses the same resource; the adapter reads the VM first and returns it when it exists. When
an allocation fails, Azure leaves the VM resource behind in state Failed: the adapter deletes it
before trying the next zone, so a failed launch leaves nothing. ``azure-mgmt-compute`` and
``azure-identity`` are imported only when the adapter makes its client.

This module must not decide where to launch and must not call Azure before the region-lock guard.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from providers.azure.build import (
    AzureNetwork,
    cannot_stop,
    is_managed,
    power_state,
    state_of,
    vm_body,
    vm_name,
)
from providers.base import (
    KEY_LABEL,
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

T = TypeVar("T")


def _api_error(exc: Exception, context: str) -> ProviderError:
    from azure.core import exceptions as aexc

    if isinstance(exc, aexc.ClientAuthenticationError) and exc.status_code is None:
        return AuthError(
            f"azure: {context}: no usable Azure credentials ({exc.message}); set AZURE_TENANT_ID,"
            " AZURE_CLIENT_ID and AZURE_CLIENT_SECRET, or run with a managed identity",
            cloud="azure",
        )
    if isinstance(exc, aexc.HttpResponseError):
        code = ""
        message = exc.message or ""
        if exc.error is not None:
            code = exc.error.code or ""
            message = exc.error.message or message
        return make_error("azure", code, message, exc.status_code, context)
    if isinstance(exc, aexc.ServiceRequestError | aexc.ServiceResponseError):
        return TransientError(f"azure: {context}: {exc}", cloud="azure")
    return ProviderError(f"azure: {context}: {type(exc).__name__}: {exc}", cloud="azure")


def _json(response: Any, deserialized: Any, headers: Any) -> Any:
    return response.http_response.json()


class AzureProvider(Provider):
    """Azure VMs in one subscription and resource group.

    ``base_url`` points the client elsewhere (a test double); ``allow_http`` lets bearer tokens
    travel over plain HTTP, which only such a double needs. ``client_kwargs`` reach the SDK
    client (e.g. ``retry_total``).
    """

    cloud = "azure"

    def __init__(
        self,
        subscription_id: str,
        resource_group: str,
        network: AzureNetwork,
        *,
        catalog: Catalog | None = None,
        memory: CapacityMemory | None = None,
        credential: Any = None,
        base_url: str | None = None,
        allow_http: bool = False,
        poll_interval_s: float = 10.0,
        client_kwargs: Mapping[str, Any] | None = None,
        state_timeout_s: float = 900.0,
    ) -> None:
        super().__init__(catalog, memory)
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.network = network
        self._credential = credential
        self._base_url = base_url
        self._call_kwargs: dict[str, Any] = {"enforce_https": False} if allow_http else {}
        self._poll_interval_s = poll_interval_s
        self._state_timeout_s = state_timeout_s
        self._client_kwargs = dict(client_kwargs or {})
        self._client: Any = None
        self._lock = threading.Lock()

    def _vms(self) -> Any:
        with self._lock:
            if self._client is None:
                from azure.mgmt.compute import ComputeManagementClient

                credential = self._credential
                if credential is None:
                    from azure.identity import DefaultAzureCredential

                    credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
                kwargs = dict(self._client_kwargs)
                if self._base_url:
                    kwargs["base_url"] = self._base_url
                self._client = ComputeManagementClient(credential, self.subscription_id, **kwargs)
            return self._client.virtual_machines

    def _call(self, context: str, func: Callable[[], T]) -> T:
        try:
            return func()
        except ProviderError:
            raise
        except Exception as exc:
            raise _api_error(exc, context) from exc

    def _to_instance(self, raw: Mapping[str, Any]) -> Instance:
        properties = raw.get("properties", {})
        tags = dict(raw.get("tags") or {})
        zones = raw.get("zones") or [""]
        return Instance(
            key=tags.get(KEY_LABEL, ""),
            cloud="azure",
            instance_id=str(raw.get("id", raw.get("name", ""))),
            instance_type=properties.get("hardwareProfile", {}).get("vmSize", ""),
            region=str(raw.get("location", "")),
            zone=str(zones[0]),
            state=state_of(properties.get("provisioningState", ""), power_state(properties)),
            spot=properties.get("priority") == "Spot",
            labels=tags,
            cannot_stop=cannot_stop(properties),
        )

    def _get(self, name: str) -> Instance | None:
        from azure.core.exceptions import ResourceNotFoundError

        self._call(f"get {name}", self._vms)
        try:
            raw = self._raw(name)
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            raise _api_error(exc, f"get {name}") from exc
        return self._to_instance(raw)

    def _raw(self, name: str) -> Any:
        """The VM's ARM JSON with its instance view (the power state is only there)."""
        vms = self._vms()
        return vms.get(
            self.resource_group, name, expand="instanceView", cls=_json, **self._call_kwargs
        )

    def _delete(self, name: str) -> None:
        vms = self._vms()
        self._call(
            f"delete {name}",
            lambda: vms.begin_delete(
                self.resource_group,
                name,
                polling_interval=self._poll_interval_s,
                **self._call_kwargs,
            ).result(),
        )

    def launch(self, request: LaunchRequest) -> Instance:
        zones = self.check_request(request)
        name = vm_name(request.key)
        existing = self._get(name)
        if existing is not None and existing.state != "failed":
            return existing
        if existing is not None:
            self._delete(name)  # a Failed leftover of an earlier attempt
        vms = self._vms()

        def attempt(zone: str) -> Instance:
            context = f"create {request.instance_type} as {name} in {request.region}"
            if zone:
                context += f" zone {zone}"
            body = vm_body(request, zone, self.network)
            try:
                self._call(
                    context,
                    lambda: vms.begin_create_or_update(
                        self.resource_group,
                        name,
                        body,
                        polling_interval=self._poll_interval_s,
                        **self._call_kwargs,
                    ).result(),
                )
            except ProviderError:
                leftover = self._get(name)
                if leftover is not None and leftover.state == "failed":
                    self._delete(name)
                raise
            found = self._get(name)
            if found is None:
                raise ProviderError(f"azure: {context}: done, but the VM is gone", cloud="azure")
            return found

        return self.failover(request, zones, attempt)

    def describe(self, key: str) -> Instance | None:
        return self._get(vm_name(key))

    def terminate(self, key: str) -> None:
        name = vm_name(key)
        if self._get(name) is not None:
            self._delete(name)

    def list_managed(self) -> list[Instance]:
        vms = self._call("list VMs", self._vms)

        def collect() -> list[Instance]:
            found = []
            listing = vms.list(self.resource_group, expand="instanceView", **self._call_kwargs)
            for vm in listing:
                raw = vm.as_dict()
                if is_managed(raw.get("tags")):
                    found.append(self._to_instance(raw))
            return found

        return self._call(f"list VMs in {self.resource_group}", collect)

    # -- the warm pool -------------------------------------------------------------------------

    def _settle(self, key: str, wanted: tuple[str, ...], what: str) -> Instance | None:
        return wait_for_state(
            lambda: self.describe(key),
            wanted,
            timeout_s=self._state_timeout_s,
            poll_s=self._poll_interval_s,
            what=f"azure: {what} {vm_name(key)}",
        )

    def _power(self, name: str) -> str:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            raw = self._raw(name)
        except ResourceNotFoundError:
            return ""
        except Exception as exc:
            raise _api_error(exc, f"get {name}") from exc
        return power_state(raw.get("properties", {}))

    def stop(self, key: str) -> Instance | None:
        """Deallocate the VM (a power-off alone would keep billing for the hardware)."""
        name = vm_name(key)
        instance = self._get(name)
        if instance is None:
            return None
        if instance.cannot_stop:
            raise CannotStopError(
                f"azure: {name} cannot be stopped: {instance.cannot_stop}", cloud="azure"
            )
        if instance.state == "pending":
            instance = self._settle(key, ("running", "stopped"), "waiting to stop")
            if instance is None:
                return None
        if self._power(name) == "deallocated":
            return instance
        vms = self._vms()
        self._call(
            f"deallocate {name}",
            lambda: vms.begin_deallocate(
                self.resource_group,
                name,
                polling_interval=self._poll_interval_s,
                **self._call_kwargs,
            ).result(),
        )
        return self._get(name)

    def start(self, key: str) -> Instance | None:
        name = vm_name(key)
        instance = self._get(name)
        if instance is None or instance.state in ("pending", "running"):
            return instance
        if instance.state == "stopping":
            instance = self._settle(key, ("stopped", "running"), "waiting to start")
            if instance is None or instance.state != "stopped":
                return instance
        vms = self._vms()
        self._call(
            f"start {name}",
            lambda: vms.begin_start(
                self.resource_group,
                name,
                polling_interval=self._poll_interval_s,
                **self._call_kwargs,
            ).result(),
        )
        return self._get(name)

    def set_labels(self, key: str, labels: Mapping[str, str | None]) -> None:
        check_labels("azure", labels)
        name = vm_name(key)
        instance = self._get(name)
        if instance is None:
            return
        tags = dict(instance.labels)
        for tag, value in labels.items():
            if value is None:
                tags.pop(tag, None)
            else:
                tags[tag] = value
        vms = self._vms()
        # A PATCH's tags replace the VM's tags as a whole: send them all.
        self._call(
            f"update tags of {name}",
            lambda: vms.begin_update(
                self.resource_group,
                name,
                {"tags": tags},
                polling_interval=self._poll_interval_s,
                **self._call_kwargs,
            ).result(),
        )
