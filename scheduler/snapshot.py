"""The fleet state as a snapshot for decisions (:mod:`decisions.fleetview`).

:func:`snapshot_from_fleet` turns what :class:`scheduler.fleet.FleetState` knows (agent records
with their health) into the few facts placement, autoscaling and routing read: per agent its
pool, where it runs, whether it is connected, which GPUs are free; per replica its deployment,
state and load; per deployment the gateways' figures (:func:`gateway_loads`: queue, oldest wait,
in flight, overflow), summed over the gateway reports it is given, which the caller picks
(the recent ones).

No I/O and no clocks here; protobuf is converted to fleet records elsewhere (the CLI and the
server), never in this module.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from decisions.fleetview import AgentView, FleetSnapshot, GatewayLoad, ReplicaState, ReplicaView
from providers.base import INSTANCE_TYPE_LABEL, KEY_LABEL
from providers.catalog import Catalog
from scheduler.fleet import DRAINABLE, AgentHealth, AgentRecord, GatewayRecord


def _price(catalog: Catalog | None, provider: str, instance_type: str, region: str) -> float:
    if catalog is None or not instance_type:
        return 0.0
    cloud = catalog.clouds.get(provider)
    itype = cloud.instance_types.get(instance_type) if cloud else None
    return itype.prices.get(region, 0.0) if itype else 0.0


def gateway_loads(gateways: Iterable[GatewayRecord]) -> dict[str, GatewayLoad]:
    """Per deployment, the figures of ``gateways`` together: queue depths, overflow and
    in-flight counts summed, the oldest wait the longest of any."""
    totals: dict[str, tuple[int, float, float, dict[str, int], int]] = {}
    for record in gateways:
        for d in record.report.deployments:
            depth, oldest, overflow, in_flight, count = totals.get(
                d.deployment, (0, 0.0, 0.0, {}, 0)
            )
            for target, n in d.in_flight.items():
                in_flight[target] = in_flight.get(target, 0) + n
            totals[d.deployment] = (
                depth + d.queue_depth,
                max(oldest, d.oldest_queued_s),
                overflow + d.overflow_tokens_per_s,
                in_flight,
                count + 1,
            )
    return {
        name: GatewayLoad(depth, oldest, overflow, in_flight, count)
        for name, (depth, oldest, overflow, in_flight, count) in sorted(totals.items())
    }


def snapshot_from_fleet(
    agents: Iterable[tuple[AgentRecord, AgentHealth]],
    catalog: Catalog | None = None,
    *,
    gateways: Iterable[GatewayRecord] = (),
    draining: Collection[str] = (),
) -> FleetSnapshot:
    """The snapshot of ``FleetState.agents()`` (or records converted from ``GetFleet``).

    With ``catalog``, agents labelled with an ``instance_type`` get its list price.
    ``gateways`` are the gateway reports whose figures count (``FleetState.gateways`` within
    the stale limit); ``draining`` the replicas the control plane drains through the gateways,
    shown DRAINING before their agents say so.
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
                        ReplicaState.DRAINING
                        if r.replica_id in draining and r.state in DRAINABLE
                        else r.state,
                        r.load.running_requests,
                        r.load.queued_requests,
                        r.load.kv_cache_usage,
                        r.load.generation_tokens_per_second,
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
    return FleetSnapshot(tuple(views), tuple(replicas), gateway_loads(gateways))
