"""The fleet state as a snapshot for decisions (:mod:`decisions.fleetview`).

:func:`snapshot_from_fleet` turns what :class:`scheduler.fleet.FleetState` knows (agent records
with their health) into the few facts placement, autoscaling and routing read: per agent its
pool, where it runs, whether it is connected, which GPUs are free; per replica its deployment,
state and load.

No I/O and no clocks here; protobuf is converted to fleet records elsewhere (the CLI and the
server), never in this module.
"""

from __future__ import annotations

from collections.abc import Iterable

from decisions.fleetview import AgentView, FleetSnapshot, ReplicaView
from providers.base import INSTANCE_TYPE_LABEL, KEY_LABEL
from providers.catalog import Catalog
from scheduler.fleet import AgentHealth, AgentRecord


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
