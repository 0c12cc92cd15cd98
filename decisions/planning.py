"""One planning step of a deployment: autoscaling, then placement, as workflow dataclasses.

It adds what only the workflow knows to the fleet snapshot (replicas being brought up count as
capacity and hold their reserved GPUs; replicas being released do not count), runs the pure
:func:`decisions.autoscale.decide` and :func:`decisions.placement.place`, and turns the result
into :class:`~workflows.types.PlanOutput`. For every cloud placement it lists the offers a
provision may fail over to: the chosen one first, then the next cheapest inside the lock that
still fit the spend cap.

Pure: no I/O and no clocks (``now``, replica ids and the capacity memory are arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from decisions.autoscale import Sample, decide, fast_signal, signal
from decisions.fleetview import AgentView, FleetSnapshot, ReplicaState, ReplicaView
from decisions.placement import SkipZone, place
from decisions.plantypes import (
    OfferChoice,
    PendingReplica,
    PlanInput,
    PlannedRelease,
    PlannedStart,
    PlanOutput,
    ReplicaTemplate,
    SamplePoint,
    trim_samples,
)
from decisions.policy import Deployment, Policy, resolve_lock, spill_providers
from decisions.spilling import adjust
from providers.catalog import Catalog, Offer, OfferRequest
from providers.errors import ProviderError


def with_pending(
    snapshot: FleetSnapshot, deployment: str, pending: Sequence[PendingReplica], releasing: set[str]
) -> FleetSnapshot:
    """The snapshot as the workflow sees it: pending replicas starting, releasing ones leaving."""
    seen = {r.replica_id for r in snapshot.replicas}
    held: dict[str, set[int]] = {}
    extra: list[ReplicaView] = []
    for p in pending:
        if p.where == "reserved" and p.agent_id:
            held.setdefault(p.agent_id, set()).update(p.gpu_indices)
        if p.replica_id not in seen:
            extra.append(ReplicaView(p.replica_id, deployment, p.agent_id, ReplicaState.STARTING))
    agents = tuple(
        replace(a, free_gpus=tuple(g for g in a.free_gpus if g not in held[a.agent_id]))
        if a.agent_id in held
        else a
        for a in snapshot.agents
    )
    replicas = tuple(
        replace(r, state=ReplicaState.DRAINING) if r.replica_id in releasing else r
        for r in snapshot.replicas
    )
    return replace(snapshot, agents=agents, replicas=replicas + tuple(extra))


def template_of(name: str, dep: Deployment) -> ReplicaTemplate:
    return ReplicaTemplate(
        deployment=name,
        model=dep.model,
        weights=dep.weights,
        runtime=dep.runtime,
        runtime_args=list(dep.runtime_args),
        sku=dep.sku,
        gpus=dep.gpus,
    )


def offers_in_lock(
    policy: Policy, dep: Deployment, catalog: Catalog, skip_zone: SkipZone | None = None
) -> list[Offer]:
    """Offers of ``dep``'s SKU from the clouds it may spill to, inside its lock, cheapest
    first, without the zones ``skip_zone`` rejects; empty when the catalog cannot answer."""
    lock = resolve_lock(policy, dep, catalog)
    try:
        ranked = catalog.offers(
            OfferRequest(dep.sku, dep.gpus, clouds=frozenset(spill_providers(policy, dep))),
            skip_zone=skip_zone,
        )
    except ProviderError:
        return []
    return [o for o in ranked if lock.allows_region(o.cloud, o.region)]


def failover_offers(
    policy: Policy,
    dep: Deployment,
    catalog: Catalog,
    chosen: Offer,
    budget_usd_per_hour: float | None,
    limit: int,
    skip_zone: SkipZone | None = None,
) -> list[OfferChoice]:
    """``chosen`` first, then up to ``limit - 1`` more offers inside the lock, cheapest first.

    Capacity runs out per cloud as often as per region, so the fallbacks hold the cheapest
    offer of every other allowed cloud (while there is room) before more of the same cloud.
    """
    usable: list[Offer] = []
    for offer in offers_in_lock(policy, dep, catalog, skip_zone):
        if (offer.cloud, offer.instance_type, offer.region) == (
            chosen.cloud,
            chosen.instance_type,
            chosen.region,
        ):
            continue
        if budget_usd_per_hour is not None and offer.usd_per_hour > budget_usd_per_hour + 1e-9:
            continue
        usable.append(offer)
    room = max(0, limit - 1)
    picked: list[Offer] = []
    seen_clouds = {chosen.cloud}
    for offer in usable:  # the cheapest of each other cloud first
        if len(picked) < room and offer.cloud not in seen_clouds:
            seen_clouds.add(offer.cloud)
            picked.append(offer)
    for offer in usable:  # then the cheapest of the rest
        if len(picked) >= room:
            break
        if offer not in picked:
            picked.append(offer)
    picked.sort(key=lambda o: o.usd_per_hour)
    return [_choice(chosen), *(_choice(o) for o in picked)]


def _choice(offer: Offer) -> OfferChoice:
    return OfferChoice(
        offer.cloud, offer.instance_type, offer.region, list(offer.zones), offer.usd_per_hour
    )


def plan_step(
    policy: Policy,
    snapshot: FleetSnapshot,
    catalog: Catalog,
    request: PlanInput,
    now: float,
    new_replica_id: Callable[[], str],
    *,
    skip_zone: SkipZone | None = None,
    offers_per_provision: int = 5,
    clouds: frozenset[str] | None = None,
    observing: str = "",
) -> PlanOutput:
    """What the deployment of ``request`` should do now, and why.

    ``clouds`` are the clouds this scheduler can rent from (None: all); the policy's providers
    are narrowed to them, and a deployment left with none reports it as a lock error.
    ``observing`` says why the fleet is not fully known yet (the scheduler just started, an
    agent has registered but not reported): nothing is started or released meanwhile, or a
    restarted scheduler would rent machines for replicas that are running but not yet seen.
    """
    name = request.deployment
    dep = policy.deployments.get(name)
    if dep is None:
        return PlanOutput(exists=False, now=now, reason="the deployment left the policy")
    unusable = ""
    if clouds is not None and dep.spillover.enabled:
        allowed = spill_providers(policy, dep)
        usable = [c for c in allowed if c in clouds]
        if not usable:
            unusable = (
                f"spillover may use {', '.join(allowed) or 'no provider'}, but this scheduler "
                f"rents only from {', '.join(sorted(clouds)) or 'no cloud'} (the clouds section "
                "of its config); nothing can be rented for this deployment"
            )
        spill = dep.spillover.model_copy(update={"providers": usable, "enabled": bool(usable)})
        dep = dep.model_copy(update={"spillover": spill})
        policy = policy.model_copy(update={"deployments": {**policy.deployments, name: dep}})
    releasing = set(request.releasing)
    view = with_pending(snapshot, name, request.pending, releasing)
    current = sum(1 for r in view.replicas if r.deployment == name and not r.leaving)
    value = signal(name, dep, view)
    window = max(dep.spillover.scale_up_window_s, dep.spillover.cool_down_s)
    samples = [Sample(s.at, s.value) for s in trim_samples(request.samples, now - window)]
    if value is not None:
        samples.append(Sample(now, value))
    decision = decide(name, dep, current, samples, now, request.last_change_at)
    rented = _rented(view, name, dep, catalog)
    rentable = (
        offers_in_lock(policy, dep, catalog, skip_zone)
        if dep.spillover.enabled and spill_providers(policy, dep)
        else []
    )
    adjusted = adjust(
        name,
        dep,
        resolve_lock(policy, dep, catalog),
        view,
        decision,
        fast_signal(name, dep, view),
        rented,
        now=now,
        cheapest_offer_usd_per_hour=rentable[0].usd_per_hour if rentable else None,
        episode=(request.episode_started_at, request.episode_seen_at, request.episodes_s),
        cheaper_since=request.cheaper_since,
        holding=bool(request.pending) or now < request.hold_until or bool(observing),
        signal_value=value,
    )
    change = adjusted.change
    reason = adjusted.reason
    holds: list[str] = []
    if change > 0 and request.pending:
        holds.append(f"{len(request.pending)} replicas still coming up; adding no more until then")
    if change > 0 and now < request.hold_until:
        holds.append(f"the last provision failed; holding for {request.hold_until - now:.0f}s")
    if observing:
        holds.append(observing)
    if holds:
        change = 0
        reason += "; " + "; ".join(holds)
    by_cost = [r for r, _, _ in adjusted.releases]
    asked = 0 if by_cost else change
    results = place(policy, view, {name: asked}, catalog, skip_zone=skip_zone)
    result = next(r for r in results if r.deployment == name)
    spilled_spend = sum(
        a.usd_per_hour
        for a in _spilled_agents(view, name, dep, catalog)
        if a.agent_id not in _releasing_agents(view, releasing)
    )
    cap = dep.spillover.max_usd_per_hour
    starts: list[PlannedStart] = []
    planned_spend = 0.0
    for placement in result.placements:
        if placement.where == "reserved":
            starts.append(
                PlannedStart(
                    new_replica_id(),
                    "reserved",
                    placement.reason,
                    agent_id=placement.agent_id,
                    gpu_indices=list(placement.gpu_indices),
                )
            )
            continue
        assert placement.offer is not None
        budget = None if cap is None else cap - spilled_spend - planned_spend
        offers = failover_offers(
            policy, dep, catalog, placement.offer, budget, offers_per_provision, skip_zone
        )
        planned_spend += placement.offer.usd_per_hour
        starts.append(PlannedStart(new_replica_id(), "cloud", placement.reason, offers=offers))
    agents = {a.agent_id: a for a in view.agents}
    if observing:
        starts = []
        result = replace(result, releases=())
    releases = [
        PlannedRelease(
            replica_id=r.replica_id,
            agent_id=r.agent_id,
            reason=r.reason,
            cloud=agents[r.agent_id].provider if r.agent_id in agents else "",
            key=agents[r.agent_id].key if r.agent_id in agents else "",
            usd_per_hour=r.usd_per_hour,
        )
        for r in result.releases
    ]
    placed = reason_of_placement(result.reason, by_cost)
    for replica, agent, why in adjusted.releases:
        if replica.replica_id not in {r.replica_id for r in releases}:
            releases.append(
                PlannedRelease(
                    replica.replica_id,
                    agent.agent_id,
                    why,
                    agent.provider,
                    agent.key,
                    agent.usd_per_hour,
                )
            )
    episodes = adjusted.episodes
    return PlanOutput(
        exists=True,
        now=now,
        sample=None if value is None else SamplePoint(now, value),
        current=current,
        desired=max(0, current + adjusted.change),
        reason=f"{reason}. {placed}",
        starts=starts,
        releases=releases,
        lock_error=result.lock_error or (unusable if result.unplaced else ""),
        notes=list(result.notes),
        template=template_of(name, dep),
        window_s=window,
        episode_started_at=episodes.started_at,
        episode_seen_at=episodes.seen_at,
        episodes_s=list(episodes.durations_s),
        cheaper_since=list(adjusted.cheaper_since),
    )


def reason_of_placement(placed: str, by_cost: Sequence[ReplicaView]) -> str:
    if not by_cost:
        return placed
    ids = ", ".join(r.replica_id for r in by_cost)
    return f"{ids} released by cost" + ("" if placed == "no change asked" else f"; {placed}")


def _rented(
    view: FleetSnapshot, name: str, dep: Deployment, catalog: Catalog
) -> list[tuple[ReplicaView, AgentView]]:
    """The deployment's replicas on rented machines, still counted as capacity."""
    agents = {a.agent_id: a for a in view.agents}
    return [
        (r, agents[r.agent_id])
        for r in view.replicas
        if r.deployment == name
        and not r.leaving
        and r.agent_id in agents
        and agents[r.agent_id].pool not in dep.pools
        and agents[r.agent_id].provider in catalog.clouds
    ]


def _spilled_agents(
    view: FleetSnapshot, name: str, dep: Deployment, catalog: Catalog
) -> list[AgentView]:
    agents = {a.agent_id: a for a in view.agents}
    out = []
    for r in view.replicas:
        agent = agents.get(r.agent_id)
        if (
            r.deployment == name
            and agent is not None
            and agent.pool not in dep.pools
            and agent.provider in catalog.clouds
        ):
            out.append(agent)
    return out


def _releasing_agents(view: FleetSnapshot, releasing: set[str]) -> set[str]:
    return {r.agent_id for r in view.replicas if r.replica_id in releasing}
