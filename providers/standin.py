"""A cloud adapter whose machines are stood in for by local agent processes.

For demos and end-to-end tests, where no VM ever boots: :meth:`StandInProvider.launch` makes the
real launch call through the cloud adapter (EC2 on a moto server, say), so idempotency, the
region lock and capacity errors behave exactly as in production, and then starts a local
``spillway agent run`` for the same key with the labels the machine's agent would register with
(cloud, region, zone, residency group, instance id, instance type, key) and the instance type's
GPUs from the catalog. Terminating stops the process and terminates the machine.

It must not be used where real machines boot: they run their own agent.
"""

from __future__ import annotations

import contextlib

from providers.base import INSTANCE_TYPE_LABEL, Instance, LaunchRequest, Provider
from providers.catalog import Offer, OfferRequest
from providers.errors import ProviderError
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
