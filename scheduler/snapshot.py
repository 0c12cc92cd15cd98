"""A fleet snapshot for placement and autoscaling: plain, frozen, and built once per decision.

:func:`snapshot_from_fleet` turns what :class:`scheduler.fleet.FleetState` knows (agent records
with their health) into the few facts placement and autoscaling read: per agent its pool, where
it runs, whether it is connected, which GPUs are free; per replica its deployment, state and
load. The snapshot is a value: decisions made from it do not change when the fleet moves on.

No I/O and no clocks here; protobuf is converted to fleet records elsewhere (the CLI and the
server), never in this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from providers.base import INSTANCE_TYPE_LABEL, KEY_LABEL
from providers.catalog import Catalog
from scheduler.fleet import AgentHealth, AgentRecord, ReplicaState


@dataclass(frozen=True, slots=True)
class AgentView:
    agent_id: str
    pool: str
    provider: str
    region: str
    residency_group: str
    connected: bool
    gpus_total: int
    #: Indices of GPUs that are healthy and held by no replica.
    free_gpus: tuple[int, ...]
    instance_type: str = ""
    #: List price of the machine, USD per hour; 0 when unknown or owned.
    usd_per_hour: float = 0.0
    #: The launch key of the machine when Spillway rented it; empty otherwise.
    key: str = ""


@dataclass(frozen=True, slots=True)
class ReplicaView:
    replica_id: str
    deployment: str
    agent_id: str
    state: ReplicaState
    running_requests: int = 0
    queued_requests: int = 0
    kv_cache_usage: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.state is ReplicaState.HEALTHY

    @property
    def leaving(self) -> bool:
        """Draining, stopped or failed: not counted as capacity any more."""
        return self.state in (ReplicaState.DRAINING, ReplicaState.STOPPED, ReplicaState.FAILED)


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    agents: tuple[AgentView, ...]
    replicas: tuple[ReplicaView, ...]

    def agent(self, agent_id: str) -> AgentView | None:
        for agent in self.agents:
            if agent.agent_id == agent_id:
                return agent
        return None


def _price(catalog: Catalog | None, provider: str, instance_type: str, region: str) -> float:
    if catalog is None or not instance_type:
        return 0.0
    cloud = catalog.clouds.get(provider)
    itype = cloud.instance_types.get(instance_type) if cloud else None
    return itype.prices.get(region, 0.0) if itype else 0.0


def snapshot_from_fleet(
    agents: Iterable[tuple[AgentRecord, AgentHealth]], catalog: Catalog | None = None
) -> FleetSnapshot:
    """The snapshot of ``FleetState.agents()`` (or records converted from ``GetFleet``).

    With ``catalog``, agents labelled with an ``instance_type`` get its list price.
    """
    views: list[AgentView] = []
    replicas: list[ReplicaView] = []
    for record, health in agents:
        reg = record.registration
        labels = reg.labels
        report = record.report
        if report is None:
            # Registered but not reported yet: which GPUs are free is not known.
            free: tuple[int, ...] = ()
        else:
            free = tuple(sorted(g.index for g in report.gpus if g.healthy and not g.replica_id))
            for r in report.replicas:
                replicas.append(
                    ReplicaView(
                        r.replica_id,
                        r.deployment,
                        reg.agent_id,
                        r.state,
                        r.load.running_requests,
                        r.load.queued_requests,
                        r.load.kv_cache_usage,
                    )
                )
        itype = labels.extra.get(INSTANCE_TYPE_LABEL, "")
        views.append(
            AgentView(
                agent_id=reg.agent_id,
                pool=labels.pool,
                provider=labels.provider,
                region=labels.region,
                residency_group=labels.residency_group,
                connected=health is AgentHealth.CONNECTED,
                gpus_total=len(reg.gpus),
                free_gpus=free,
                instance_type=itype,
                usd_per_hour=_price(catalog, labels.provider, itype, labels.region),
                key=labels.extra.get(KEY_LABEL, ""),
            )
        )
    return FleetSnapshot(tuple(views), tuple(replicas))
