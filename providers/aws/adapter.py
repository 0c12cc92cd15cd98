"""The AWS EC2 adapter: launch, find, terminate, list, stop and start Spillway's GPU machines.

Idempotency: every launch carries an EC2 ClientToken derived from the key and zone, and before
launching the adapter looks for a live machine tagged with the key (the tag lookup is what makes
relaunch safe where ClientToken is not honoured, and across zones). boto3 is imported only when
an adapter is created, so the rest of Spillway runs without it.

This module must not decide where to launch (placement does) and must not call EC2 before the
region-lock guard has passed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from providers.aws.build import (
    AwsNetwork,
    key_filter,
    managed_filter,
    run_instances_params,
    tag_changes,
    to_instance,
)
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

if TYPE_CHECKING:
    import boto3

T = TypeVar("T")


def _translate(exc: Exception, context: str) -> ProviderError:
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return make_error(
            "aws", str(error.get("Code", "")), str(error.get("Message", "")), status, context
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AuthError(
            f"aws: {context}: no usable AWS credentials ({exc}); set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run with an instance role",
            cloud="aws",
        )
    if isinstance(exc, NoRegionError):
        return ProviderError(f"aws: {context}: {exc}", cloud="aws")
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        return TransientError(f"aws: {context}: {exc}", cloud="aws")
    return ProviderError(f"aws: {context}: {type(exc).__name__}: {exc}", cloud="aws")


class AwsProvider(Provider):
    """EC2 in the regions of the catalog (or ``regions``).

    ``regions`` bounds where :meth:`describe`, :meth:`terminate` and :meth:`list_managed` look;
    launches go wherever the request says, once the guard allows it.
    """

    cloud = "aws"

    def __init__(
        self,
        *,
        catalog: Catalog | None = None,
        memory: CapacityMemory | None = None,
        regions: Sequence[str] | None = None,
        network: AwsNetwork | None = None,
        session: boto3.Session | None = None,
        endpoint_url: str | None = None,
        poll_interval_s: float = 5.0,
        state_timeout_s: float = 900.0,
    ) -> None:
        super().__init__(catalog, memory)
        import boto3

        self.regions = tuple(regions or self.catalog.cloud("aws").regions)
        self.network = network or AwsNetwork()
        self._session = session or boto3.Session()
        self._endpoint_url = endpoint_url
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._poll_interval_s = poll_interval_s
        self._state_timeout_s = state_timeout_s

    def _ec2(self, region: str) -> Any:
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = self._session.client(
                    "ec2", region_name=region, endpoint_url=self._endpoint_url
                )
                self._clients[region] = client
            return client

    def _call(self, context: str, func: Callable[[], T]) -> T:
        try:
            return func()
        except ProviderError:
            raise
        except Exception as exc:
            raise _translate(exc, context) from exc

    def _find(self, region: str, filters: list[dict[str, Any]]) -> list[Instance]:
        client = self._ec2(region)
        found: list[Instance] = []
        paginator = client.get_paginator("describe_instances")
        pages = self._call(
            f"describe_instances in {region}", lambda: list(paginator.paginate(Filters=filters))
        )
        for page in pages:
            for reservation in page.get("Reservations", []):
                for raw in reservation.get("Instances", []):
                    found.append(to_instance(raw, region))
        return found

    def launch(self, request: LaunchRequest) -> Instance:
        zones = self.check_request(request)
        # The key may already have a machine, in this region or (an earlier offer) another one.
        for region in (request.region, *(r for r in self.regions if r != request.region)):
            existing = self._find(region, key_filter(request.key))
            if existing:
                return existing[0]
        client = self._ec2(request.region)

        def attempt(zone: str) -> Instance:
            params = run_instances_params(request, zone, self.network)
            context = f"run_instances {request.instance_type} in {zone}"
            response = self._call(context, lambda: client.run_instances(**params))
            return to_instance(response["Instances"][0], request.region)

        return self.failover(request, zones, attempt)

    def describe(self, key: str) -> Instance | None:
        for region in self.regions:
            found = self._find(region, key_filter(key))
            if found:
                return found[0]
        return None

    def terminate(self, key: str) -> None:
        for region in self.regions:
            ids = [i.instance_id for i in self._find(region, key_filter(key))]
            if not ids:
                continue
            client = self._ec2(region)
            try:
                self._call(
                    f"terminate_instances {', '.join(ids)}",
                    lambda: client.terminate_instances(InstanceIds=ids),  # noqa: B023
                )
            except ProviderError as exc:
                if not exc.code.startswith("InvalidInstanceID.NotFound"):
                    raise

    def list_managed(self) -> list[Instance]:
        found: list[Instance] = []
        for region in self.regions:
            found.extend(self._find(region, managed_filter()))
        return found

    def _settle(self, key: str, wanted: tuple[str, ...], what: str) -> Instance | None:
        return wait_for_state(
            lambda: self.describe(key),
            wanted,
            timeout_s=self._state_timeout_s,
            poll_s=self._poll_interval_s,
            what=f"aws: {what} {key}",
        )

    def stop(self, key: str) -> Instance | None:
        instance = self.describe(key)
        if instance is None:
            return None
        if instance.cannot_stop:
            raise CannotStopError(
                f"aws: {instance.instance_id} cannot be stopped: {instance.cannot_stop}",
                cloud="aws",
            )
        if instance.state == "pending":
            instance = self._settle(key, ("running", "stopped", "terminated"), "waiting to stop")
        if instance is None or instance.state in ("stopped", "terminated"):
            return instance
        if instance.state == "running":
            client = self._ec2(instance.region)
            ids = [instance.instance_id]
            self._call(
                f"stop_instances {instance.instance_id}",
                lambda: client.stop_instances(InstanceIds=ids),
            )
        return self._settle(key, ("stopped", "terminated"), "stopping")

    def start(self, key: str) -> Instance | None:
        instance = self.describe(key)
        if instance is None or instance.state in ("pending", "running"):
            return instance
        if instance.state == "stopping":
            instance = self._settle(key, ("stopped", "terminated"), "waiting to start")
            if instance is None:
                return None
        if instance.state != "stopped":
            return instance
        client = self._ec2(instance.region)
        ids = [instance.instance_id]
        self._call(
            f"start_instances {instance.instance_id}",
            lambda: client.start_instances(InstanceIds=ids),
        )
        return self.describe(key)

    def set_labels(self, key: str, labels: Mapping[str, str | None]) -> None:
        check_labels("aws", labels)
        instance = self.describe(key)
        if instance is None:
            return
        client = self._ec2(instance.region)
        create, delete = tag_changes(labels)
        ids = [instance.instance_id]
        if create:
            self._call(
                f"create_tags on {instance.instance_id}",
                lambda: client.create_tags(Resources=ids, Tags=create),
            )
        if delete:
            self._call(
                f"delete_tags on {instance.instance_id}",
                lambda: client.delete_tags(Resources=ids, Tags=delete),
            )
