"""Placement: where new replicas go and which ones leave, each decision with its reason.

Scaling up, reserved capacity comes first: free GPUs in the deployment's pools, on connected
agents only, a whole replica on one agent (a replica of N GPUs needs N free GPUs on one agent).
What does not fit goes to cloud offers for the deployment's fungible SKU, cheapest first, among
the allowed providers and only inside the residency lock, skipping offers whose every zone is in
the capacity-error memory, within ``max_spilled_replicas`` and the hourly spend cap. Scaling
down releases spilled replicas, most expensive first; reserved replicas are never released to
save money (they are already paid for).

The lock is never bent: when nothing inside it can take a replica, the decision says so and
places nothing. Spilled replicas found outside their lock (a policy edit moved it) or beyond
``max_spilled_replicas`` are released whatever the requested change.

Pure functions: no I/O, no clocks, no randomness. Everything (policy, snapshot, catalog, the
capacity-error memory as a predicate, current spend) is an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from decisions.fleetview import AgentView, FleetSnapshot, ReplicaView
from decisions.policy import Deployment, Lock, Policy, resolve_lock, spill_providers
from providers.catalog import Catalog, Offer, OfferRequest
from providers.errors import ProviderError

#: (cloud, instance type, zone) -> True when that zone recently had no capacity.
SkipZone = Callable[[str, str, str], bool]


def skip_set(blocked: Sequence[tuple[str, str, str]] | frozenset[tuple[str, str, str]]) -> SkipZone:
    """A :data:`SkipZone` from a set of (cloud, instance type, zone) triples."""
    frozen = frozenset(blocked)
    return lambda cloud, itype, zone: (cloud, itype, zone) in frozen


@dataclass(frozen=True, slots=True)
class Placement:
    """One new replica: on a reserved agent's GPUs, or on a machine rented from ``offer``."""

    deployment: str
    where: Literal["reserved", "cloud"]
    reason: str
    agent_id: str = ""
    gpu_indices: tuple[int, ...] = ()
    offer: Offer | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """One spilled replica to drain, and its machine to give back."""

    deployment: str
    replica_id: str
    agent_id: str
    usd_per_hour: float
    reason: str


@dataclass(frozen=True, slots=True)
class DeploymentPlacement:
    deployment: str
    requested: int
    placements: tuple[Placement, ...] = ()
    releases: tuple[Release, ...] = ()
    #: Replicas asked for that could not be placed (see ``reason``).
    unplaced: int = 0
    #: Why, in one or more sentences, for people.
    reason: str = ""
    #: Set when nothing inside the residency lock can ever take a replica: a plain error.
    lock_error: str = ""
    notes: tuple[str, ...] = field(default=())


@dataclass
class _Pools:
    """Free GPUs per agent, handed out as placement goes (shared pools: first come)."""

    free: dict[str, list[int]]
    by_pool: dict[str, list[AgentView]]

    @classmethod
    def of(cls, snapshot: FleetSnapshot) -> _Pools:
        free: dict[str, list[int]] = {}
        by_pool: dict[str, list[AgentView]] = {}
        for agent in snapshot.agents:
            free[agent.agent_id] = list(agent.free_gpus)
            by_pool.setdefault(agent.pool, []).append(agent)
        return cls(free, by_pool)


def _lock_name(lock: Lock) -> str:
    return f"residency group {lock.name!r}" if lock.name else "any region (no lock)"


class _Offers:
    """Catalog offers per (SKU, GPUs, clouds), computed once per call of :func:`place`."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._cache: dict[tuple[str, int, frozenset[str]], list[Offer] | str] = {}

    def get(self, sku: str, gpus: int, clouds: frozenset[str]) -> list[Offer] | str:
        key = (sku, gpus, clouds)
        found = self._cache.get(key)
        if found is None:
            try:
                found = self.catalog.offers(OfferRequest(sku, gpus, clouds=clouds))
            except ProviderError as exc:
                found = str(exc)
            self._cache[key] = found
        return found


def place(
    policy: Policy,
    snapshot: FleetSnapshot,
    changes: Mapping[str, int],
    catalog: Catalog,
    *,
    skip_zone: SkipZone | None = None,
    spend: Mapping[str, float] | None = None,
) -> list[DeploymentPlacement]:
    """Decide where ``changes[name]`` more (or, negative, fewer) replicas of each deployment go.

    Deployments are handled in the policy's order, so those listed first get shared reserved
    GPUs first. ``spend`` is each deployment's current hourly list price of rented machines
    (default: summed from the snapshot's agents). Every deployment of the policy gets one
    result, also when its change is 0 (corrections of lock or spill-limit violations).
    """
    pools = _Pools.of(snapshot)
    offers = _Offers(catalog)
    agents = {a.agent_id: a for a in snapshot.agents}
    by_deployment: dict[str, list[ReplicaView]] = {}
    for replica in snapshot.replicas:
        by_deployment.setdefault(replica.deployment, []).append(replica)
    results = []
    for name, dep in policy.deployments.items():
        lock = resolve_lock(policy, dep, catalog)
        replicas = by_deployment.get(name, [])
        spilled = [
            (r, agents[r.agent_id])
            for r in replicas
            if r.agent_id in agents
            and agents[r.agent_id].pool not in dep.pools
            and agents[r.agent_id].provider in catalog.clouds
            and not r.leaving
        ]
        current_spend = (
            spend[name]
            if spend is not None and name in spend
            else sum(a.usd_per_hour for _, a in spilled)
        )
        results.append(
            _place_one(
                name,
                dep,
                lock,
                changes.get(name, 0),
                pools,
                spilled,
                current_spend,
                offers,
                spill_providers(policy, dep),
                skip_zone,
            )
        )
    return results


def _place_one(
    name: str,
    dep: Deployment,
    lock: Lock,
    change: int,
    pools: _Pools,
    spilled: list[tuple[ReplicaView, AgentView]],
    spend: float,
    offers: _Offers,
    providers: list[str],
    skip_zone: SkipZone | None,
) -> DeploymentPlacement:
    """One deployment: corrections first, then scale down, or reserved GPUs and cloud offers."""
    limit = dep.spillover.max_spilled_replicas if dep.spillover.enabled else 0
    kept, releases = _corrections(name, lock, limit, spilled)
    spend -= sum(r.usd_per_hour for r in releases)
    if change < 0:
        return _scale_down(name, -change, kept, releases)
    if change == 0:
        reason = "no change asked" + (f"; releasing {len(releases)}" if releases else "")
        return DeploymentPlacement(name, 0, releases=tuple(releases), reason=reason)

    out = _Outcome(name, change, releases)
    _place_reserved(out, dep, lock, pools)
    need = change - len(out.placements)
    if need == 0:
        return out.done(f"{change} on reserved GPUs")
    reserved_part = (
        f"{len(out.placements)} on reserved GPUs; " if out.placements else "no reserved GPUs free; "
    )
    if not dep.spillover.enabled:
        return out.done(reserved_part + f"{need} not placed: spillover is off", unplaced=need)
    found = _offers_to_try(dep, lock, offers, providers, skip_zone)
    if isinstance(found, _NoOffer):
        return out.done(
            reserved_part + f"{need} not placed: {found.reason}",
            unplaced=need,
            lock_error=found.lock_error,
        )
    stop = _place_cloud(out, dep, lock, found, need, room=limit - len(kept), spend=spend)
    need = change - len(out.placements)
    clouds = sum(1 for p in out.placements if p.where == "cloud")
    reason = reserved_part + f"{clouds} on cloud offers"
    if need:
        reason += f"; {need} not placed: {stop}"
    return out.done(reason, unplaced=need)


@dataclass
class _Outcome:
    """What one deployment's placement has decided so far."""

    deployment: str
    requested: int
    releases: list[Release]
    placements: list[Placement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def done(self, reason: str, *, unplaced: int = 0, lock_error: str = "") -> DeploymentPlacement:
        return DeploymentPlacement(
            self.deployment,
            self.requested,
            tuple(self.placements),
            tuple(self.releases),
            unplaced=unplaced,
            reason=reason,
            lock_error=lock_error,
            notes=tuple(self.notes),
        )


def _corrections(
    name: str, lock: Lock, limit: int, spilled: list[tuple[ReplicaView, AgentView]]
) -> tuple[list[tuple[ReplicaView, AgentView]], list[Release]]:
    """Spilled replicas outside the lock, then beyond ``limit`` (dearest first), are released.

    Returns the replicas kept (dearest first) and the releases.
    """
    releases: list[Release] = []
    kept: list[tuple[ReplicaView, AgentView]] = []
    for replica, agent in spilled:
        if lock.allows_region(agent.provider, agent.region):
            kept.append((replica, agent))
            continue
        releases.append(
            Release(
                name,
                replica.replica_id,
                agent.agent_id,
                agent.usd_per_hour,
                f"runs in {agent.provider} {agent.region}, outside {_lock_name(lock)}",
            )
        )
    kept.sort(key=lambda ra: (-ra[1].usd_per_hour, ra[0].replica_id))
    while len(kept) > limit:
        replica, agent = kept.pop(0)
        releases.append(
            Release(
                name,
                replica.replica_id,
                agent.agent_id,
                agent.usd_per_hour,
                f"{len(kept) + 1} spilled replicas, the policy allows {limit}; "
                f"the dearest goes first (${agent.usd_per_hour:.2f}/h)",
            )
        )
    return kept, releases


def _place_reserved(out: _Outcome, dep: Deployment, lock: Lock, pools: _Pools) -> None:
    """Free reserved GPUs: connected agents of the deployment's pools, inside the lock, best fit
    (the agent with the fewest free GPUs that still fit a whole replica goes first)."""
    candidates: list[AgentView] = []
    for pool in dep.pools:
        for agent in pools.by_pool.get(pool, ()):
            if not agent.connected:
                continue
            if not lock.allows_agent(agent.residency_group):
                out.notes.append(
                    f"agent {agent.agent_id} of pool {pool} is outside {_lock_name(lock)} "
                    f"(residency_group {agent.residency_group or 'unset'!r}); not used"
                )
                continue
            if len(pools.free[agent.agent_id]) >= dep.gpus:
                candidates.append(agent)
    candidates.sort(key=lambda a: (len(pools.free[a.agent_id]), a.agent_id))
    need = out.requested
    for agent in candidates:
        free = pools.free[agent.agent_id]
        while need > 0 and len(free) >= dep.gpus:
            taken, free[:] = free[: dep.gpus], free[dep.gpus :]
            out.placements.append(
                Placement(
                    out.deployment,
                    "reserved",
                    f"free reserved GPUs: {dep.gpus} on {agent.agent_id} (pool {agent.pool})",
                    agent_id=agent.agent_id,
                    gpu_indices=tuple(taken),
                )
            )
            need -= 1
        if need == 0:
            break


@dataclass(frozen=True, slots=True)
class _NoOffer:
    reason: str
    #: Set when no offer inside the lock exists at all (not only none available now).
    lock_error: str = ""


def _offers_to_try(
    dep: Deployment,
    lock: Lock,
    offers: _Offers,
    providers: list[str],
    skip_zone: SkipZone | None,
) -> list[Offer] | _NoOffer:
    """Cloud offers inside the lock, cheapest first, less zones in the capacity-error memory."""
    if not providers:
        # An empty set would mean every cloud to the catalog: nothing may be rented instead.
        error = "no cloud may be rented from: spillover lists none and no credentials are set"
        return _NoOffer(error, lock_error=error)
    ranked = offers.get(dep.sku, dep.gpus, frozenset(providers))
    if isinstance(ranked, str):
        return _NoOffer(ranked, lock_error=ranked)
    inside = [o for o in ranked if lock.allows_region(o.cloud, o.region)]
    if not inside:
        error = (
            f"no region of {_lock_name(lock)} sells {dep.gpus}x {dep.sku} on "
            f"{', '.join(providers) or 'no provider'}; nothing is placed outside the lock"
        )
        return _NoOffer(error, lock_error=error)
    available: list[Offer] = []
    for offer in inside:
        if skip_zone is None:
            available.append(offer)
            continue
        zones = tuple(z for z in offer.zones if not skip_zone(offer.cloud, offer.instance_type, z))
        if zones:
            available.append(offer if zones == offer.zones else replace(offer, zones=zones))
    if not available:
        return _NoOffer(
            f"all {len(inside)} offers inside {_lock_name(lock)} recently "
            "had no capacity; they are tried again when the capacity memory forgets them"
        )
    return available


def _place_cloud(
    out: _Outcome,
    dep: Deployment,
    lock: Lock,
    available: list[Offer],
    need: int,
    *,
    room: int,
    spend: float,
) -> str:
    """Rent the cheapest available offer for each replica still needed, within the spilled
    replica limit (``room`` more) and the spend cap; returns why it stopped short, if it did."""
    limit = dep.spillover.max_spilled_replicas
    cap = dep.spillover.max_usd_per_hour
    while need > 0:
        if room <= 0:
            return f"max_spilled_replicas ({limit}) reached"
        budget = None if cap is None else cap - spend
        offer = available[0]
        if budget is not None and offer.usd_per_hour > budget + 1e-9:
            return (
                f"spend cap: ${spend:.2f}/h of ${cap:.2f}/h in use, the cheapest allowed "
                f"offer costs ${offer.usd_per_hour:.2f}/h"
            )
        out.placements.append(
            Placement(
                out.deployment,
                "cloud",
                f"cheapest allowed offer inside {_lock_name(lock)}: {offer.cloud} "
                f"{offer.instance_type} in {offer.region} at ${offer.usd_per_hour:.2f}/h",
                offer=offer,
            )
        )
        spend += offer.usd_per_hour
        room -= 1
        need -= 1
    return ""


def _scale_down(
    name: str,
    count: int,
    spilled: list[tuple[ReplicaView, AgentView]],
    releases: list[Release],
) -> DeploymentPlacement:
    ordered = sorted(spilled, key=lambda ra: (-ra[1].usd_per_hour, ra[0].replica_id))
    chosen = ordered[:count]
    for replica, agent in chosen:
        releases.append(
            Release(
                name,
                replica.replica_id,
                agent.agent_id,
                agent.usd_per_hour,
                f"demand is low; spilled replicas go first, the dearest first "
                f"(${agent.usd_per_hour:.2f}/h on {agent.provider} {agent.region})",
            )
        )
    kept = count - len(chosen)
    reason = f"{len(chosen)} spilled replicas released"
    if kept:
        reason += (
            f"; {kept} fewer than asked: reserved replicas are kept, they are already paid for"
        )
    return DeploymentPlacement(
        name,
        -count,
        releases=tuple(releases),
        unplaced=kept,
        reason=reason,
    )
