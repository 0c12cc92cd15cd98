"""A cloud adapter whose machines are stood in for by local agent processes.

For demos and end-to-end tests, where no VM ever boots: :meth:`StandInProvider.launch` makes the
real launch call through the cloud adapter (EC2 on a moto server, say), so idempotency, the
region lock and capacity errors behave exactly as in production, and then starts a local
``spillway agent run`` for the same key with the labels the machine's agent would register with
(cloud, region, zone, residency group, instance id, instance type, key) and the instance type's
GPUs from the catalog. Terminating stops the process and terminates the machine; stopping stops
both and keeps the agent's config and state, and starting starts the machine, then the agent.

It must not be used where real machines boot: they run their own agent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from providers.base import INSTANCE_TYPE_LABEL, Instance, LaunchRequest, Provider
from providers.catalog import Offer, OfferRequest
from providers.errors import CannotStopError, ProviderError
from providers.local import LocalProvider


class StandInProvider(Provider):
    """``cloud``'s machines, each stood in for by an agent process started by ``local``."""

    def __init__(self, cloud: Provider, local: LocalProvider, *, pool: str | None = None) -> None:
        super().__init__(cloud.catalog, cloud.memory)
        self.cloud = cloud.cloud
        self.inner = cloud
        self.local = local
        self.pool = pool or f"spill-{cloud.cloud}"

    def offers(self, request: OfferRequest) -> list[Offer]:
        return self.inner.offers(request)

    def launch(self, request: LaunchRequest) -> Instance:
        instance = self.inner.launch(request)
        itype = self.catalog.cloud(self.cloud).instance_types[instance.instance_type]
        sku = self.catalog.skus[itype.sku]
        try:
            self.local.boot(
                request,
                provider=self.cloud,
                region=instance.region,
                zone=instance.zone,
                residency=self.catalog.region(self.cloud, instance.region).residency,
                instance_id=instance.instance_id,
                gpu_model=sku.gpu_model,
                memory_gib=sku.memory_gib,
                gpus=itype.gpus,
                pool=self.pool,
                extra_labels={INSTANCE_TYPE_LABEL: instance.instance_type},
            )
        except ProviderError:
            with contextlib.suppress(ProviderError):
                self.inner.terminate(request.key)
            raise
        return instance

    def describe(self, key: str) -> Instance | None:
        return self.inner.describe(key)

    def terminate(self, key: str) -> None:
        self.local.terminate(key)
        self.inner.terminate(key)

    def list_managed(self) -> list[Instance]:
        return self.inner.list_managed()

    def stop(self, key: str) -> Instance | None:
        """Stop the machine (the cloud's own rules on what can stop apply) and its agent."""
        instance = self.inner.describe(key)
        if instance is None:
            self.local.terminate(key)
            return None
        if instance.cannot_stop:
            raise CannotStopError(
                f"{self.cloud}: {instance.instance_id} cannot be stopped: {instance.cannot_stop}",
                cloud=self.cloud,
            )
        self.local.stop(key)
        return self.inner.stop(key)

    def start(self, key: str) -> Instance | None:
        """Start the machine, then its agent from the config and state it kept."""
        instance = self.inner.start(key)
        if instance is not None:
            self.local.start(key)
        return instance

    def set_labels(self, key: str, labels: Mapping[str, str | None]) -> None:
        self.inner.set_labels(key, labels)
