"""How much a deployment spills now: the fast signal and the cost model over one fleet view.

:func:`decisions.autoscale.decide` gives the windowed answer. :func:`adjust` corrects it with
what cannot wait for a window and with what things cost:

* **saturated now** (:func:`decisions.autoscale.fast_signal`): requests wait longer than the
  SLO allows, or with no room anywhere: scale up on this tick, whatever the window says. The
  gateway queues only when the managed endpoints are full too, so no cost is weighed here.
* **managed overflow** (tokens going to a managed endpoint inside the lock): free reserved
  GPUs take it at once (they are paid for); a rental only when :func:`decisions.costs.rent_case`
  says the managed spend it saves over its expected useful life exceeds its cost. A windowed
  ``overflow_tokens_per_s`` decision is weighed the same way; other windowed signals rent as
  before (they see load the gateways do not). Without a managed endpoint there is nothing to
  weigh and the fast signal rents as the windowed one does.
* **release by cost**: a rented replica cheaper to release than to keep
  (:func:`decisions.costs.release_case`) for ``release_after_s`` is released, whatever the
  windowed signal does; never on a tick that scales up, saturates or waits for a provision.
* **no scale-down while the gateways overflow or saturate** (hysteresis).

It also keeps the episode bookkeeping (:func:`decisions.costs.track_episode`): an episode is
active while there is overflow, a saturated queue, or a rented replica the traffic needs.

Pure: no I/O and no clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from decisions.autoscale import FastSignal, ScaleDecision, replica_concurrency
from decisions.costs import (
    Episodes,
    ReleaseCase,
    cheapest_endpoint,
    release_case,
    rent_case,
    replicas_for,
    total_tokens_per_s,
    track_episode,
    usd_per_token,
)
from decisions.endpoints import ManagedEndpoint
from decisions.fleetview import AgentView, FleetSnapshot, ReplicaView
from decisions.plantypes import CheaperSince
from decisions.policy import Deployment, Lock


@dataclass(frozen=True, slots=True)
class SpillAdjustment:
    change: int
    reason: str
    #: Rented replicas to release by cost, with the one-line reason of each.
    releases: tuple[tuple[ReplicaView, AgentView, str], ...] = ()
    episodes: Episodes = field(default_factory=lambda: Episodes(None, None, ()))
    cheaper_since: list[CheaperSince] = field(default_factory=list)


def reserved_slots(view: FleetSnapshot, dep: Deployment, lock: Lock) -> int:
    """Whole replicas the free reserved GPUs of ``dep``'s pools inside ``lock`` would hold."""
    return sum(
        len(a.free_gpus) // dep.gpus
        for a in view.agents
        if a.pool in dep.pools and a.connected and lock.allows_agent(a.residency_group)
    )


def replica_throughput(
    name: str, dep: Deployment, view: FleetSnapshot, *, busy: bool
) -> tuple[float, str]:
    """``T`` and where it comes from: measured while the gateways overflow (every replica is
    full then) from what the healthy replicas report generating, else the policy's."""
    costs = dep.autoscaling.costs
    rates = [
        total_tokens_per_s(r.generation_tokens_per_s, costs.input_token_share)
        for r in view.replicas
        if r.deployment == name and r.healthy
    ]
    known = [x for x in rates if x is not None]
    if busy and known:
        return sum(known) / len(known), "measured"
    return costs.replica_tokens_per_s, "assumed"


def _load(view: FleetSnapshot, name: str, replica: ReplicaView) -> float:
    """Requests on a replica: the gateways' in-flight count, else what the replica reports."""
    gateway = view.gateway.get(name)
    if gateway is not None and gateway.gateways > 0:
        return float(gateway.in_flight.get(replica.replica_id, 0))
    return float(replica.running_requests + replica.queued_requests)


def adjust(
    name: str,
    dep: Deployment,
    lock: Lock,
    view: FleetSnapshot,
    decision: ScaleDecision,
    fast: FastSignal,
    rented: Sequence[tuple[ReplicaView, AgentView]],
    *,
    now: float,
    cheapest_offer_usd_per_hour: float | None,
    episode: tuple[float | None, float | None, Sequence[float]],
    cheaper_since: Sequence[CheaperSince],
    holding: bool,
    signal_value: float | None = None,
) -> SpillAdjustment:
    """The change ``dep`` should make now and why, given the windowed ``decision``.

    ``rented`` are its rented replicas still counted as capacity, ``cheapest_offer_usd_per_hour``
    the price of the offer a rental would take (None: nothing can be rented), ``episode`` the
    carried (started at, seen at, durations), ``holding`` whether a provision is pending or held
    back (no cost release then either), ``signal_value`` the windowed signal now (a release
    that would lift a per-replica signal over its target is not made: it would be undone).
    """
    costs = dep.autoscaling.costs
    endpoints = [e for e in dep.managed if lock.allows_group(e.residency_group)]
    endpoint = cheapest_endpoint(endpoints, costs.input_token_share)
    price = None if endpoint is None else usd_per_token(endpoint, costs.input_token_share)
    current, change, reason = decision.current, decision.change, decision.reason
    room_up = max(0, min(dep.max_replicas - current, dep.autoscaling.max_step_up))

    # Rented replicas the traffic needs (judged whatever happens next: they keep an episode on).
    cases = _judge(name, dep, view, rented, endpoints, price)
    needed = any(not c.cheaper for c in cases.values())
    overflow = fast.overflow_tokens_per_s
    active = bool(fast.saturated) or overflow > 0 or needed
    episodes = track_episode(active, now, episode[0], episode[1], episode[2], costs.episode_gap_s)

    T, measured = replica_throughput(name, dep, view, busy=overflow > 0)
    if fast.saturated:
        want = min(room_up, fast.wanted)
        if want > change:
            change = want
            reason = f"saturated now: {fast.saturated}; +{want}"
        elif change > 0:
            reason += f"; saturated now too: {fast.saturated}"
    elif endpoint is not None and (
        overflow > 0 or (change > 0 and dep.autoscaling.signal == "overflow_tokens_per_s")
    ):
        asked = min(room_up, max(replicas_for(overflow, T), change if change > 0 else 0))
        free = min(asked, reserved_slots(view, dep, lock))
        cloud_asked = asked - free
        parts = []
        if free:
            parts.append(f"{free} on free reserved GPUs for {overflow:.0f} tok/s of overflow")
        cloud = 0
        if cloud_asked and cheapest_offer_usd_per_hour is not None:
            case = rent_case(
                asked=cloud_asked,
                overflow_tokens_per_s=max(0.0, overflow - free * T),
                endpoint=endpoint,
                input_share=costs.input_token_share,
                replica_tokens_per_s=T,
                usd_per_hour=cheapest_offer_usd_per_hour,
                episode_age_s=episodes.age_s(now),
                episodes_s=episodes.durations_s,
                prior_episode_s=costs.expected_episode_s,
                cold_start_s=costs.cold_start_s,
                billing_minimum_s=costs.billing_minimum_s,
            )
            cloud = case.rent
            parts.append(f"{case.describe()} (a replica: {T:.0f} tok/s, {measured})")
        elif cloud_asked:
            parts.append(f"nothing to rent; staying on {endpoint.name}")
        elif not free:
            parts.append(
                f"managed overflow {overflow:.0f} tok/s on {endpoint.name}; at max_replicas"
            )
        change = free + cloud
        reason = "; ".join(parts) + (f"; +{change}" if change else "")
        if decision.change > 0 and dep.autoscaling.signal != "overflow_tokens_per_s":
            # A per-replica window saw load the gateways do not: it rents as before.
            change = max(change, decision.change)
            reason = f"{decision.reason}; {reason}"
    elif change < 0 and overflow > 0:
        change = 0
        reason += f"; but the gateways still overflow {overflow:.0f} tok/s: holding"

    if change != 0 or holding or fast.saturated:
        return SpillAdjustment(change, reason, episodes=episodes)

    blocked = _undone_by_window(name, dep, view, signal_value)
    if blocked and any(c.cheaper for c in cases.values()):
        cases = {k: c for k, c in cases.items() if not c.cheaper}
        reason += f"; {blocked}"
    releases, watch, notes = _releases(dep, rented, cases, cheaper_since, now)
    if releases:
        reason = "; ".join(r[2] for r in releases)
        change = -len(releases)
    elif notes:
        reason += "; " + "; ".join(notes)
    return SpillAdjustment(change, reason, tuple(releases), episodes, watch)


def _judge(
    name: str,
    dep: Deployment,
    view: FleetSnapshot,
    rented: Sequence[tuple[ReplicaView, AgentView]],
    endpoints: Sequence[ManagedEndpoint],
    price: float | None,
) -> dict[str, ReleaseCase]:
    """Each healthy rented replica judged on its own against the room the others leave."""
    costs = dep.autoscaling.costs
    q = replica_concurrency(dep)
    rented_ids = {r.replica_id for r, _ in rented}
    agents = {a.agent_id: a for a in view.agents}
    reserved_room = 0.0
    for r in view.replicas:
        agent = agents.get(r.agent_id)
        if (
            r.deployment == name
            and r.healthy
            and r.replica_id not in rented_ids
            and agent is not None
            and agent.pool in dep.pools
        ):
            reserved_room += max(0.0, q - _load(view, name, r))
    gateway = view.gateway.get(name)
    managed_room = 0.0
    for e in endpoints:
        used = gateway.in_flight.get(e.name, 0) if gateway is not None else 0
        managed_room += max(0, e.max_concurrency - used)
    out: dict[str, ReleaseCase] = {}
    for replica, agent in rented:
        if not replica.healthy:
            continue
        out[replica.replica_id] = release_case(
            replica_id=replica.replica_id,
            in_flight=_load(view, name, replica),
            keep_usd_per_hour=agent.usd_per_hour,
            reserved_room=reserved_room,
            managed_room=managed_room,
            replica_concurrency=q,
            replica_tokens_per_s=costs.replica_tokens_per_s,
            usd_per_token=price,
            ratio=costs.release_ratio,
            carried_tokens_per_s=total_tokens_per_s(
                replica.generation_tokens_per_s, costs.input_token_share
            ),
        )
    return out


def _undone_by_window(name: str, dep: Deployment, view: FleetSnapshot, value: float | None) -> str:
    """Why a release by cost would be undone by the windowed signal; empty when it would not.

    The per-replica signals are means over the healthy replicas: one fewer lifts the mean by
    ``n / (n - 1)``. Over the target, the window would rent again what cost released.
    """
    scaling = dep.autoscaling
    if value is None or scaling.signal in ("queued_at_gateway", "overflow_tokens_per_s"):
        return ""
    n = sum(1 for r in view.replicas if r.deployment == name and r.healthy)
    if value <= 0:
        return ""
    after = value * n / (n - 1) if n > 1 else float("inf")
    if after <= scaling.target:
        return ""
    shown = f"{after:.2f}" if n > 1 else "no replica at all"
    return (
        f"one rented replica fewer would put {scaling.signal} at {shown} over its target "
        f"{scaling.target:g}: no release by cost"
    )


def _releases(
    dep: Deployment,
    rented: Sequence[tuple[ReplicaView, AgentView]],
    cases: dict[str, ReleaseCase],
    cheaper_since: Sequence[CheaperSince],
    now: float,
) -> tuple[list[tuple[ReplicaView, AgentView, str]], list[CheaperSince], list[str]]:
    """The dearest rented replica cheaper to release for long enough (one a tick: releasing
    it changes the room the others would move into); the bookkeeping of the others; notes on
    those still waiting."""
    costs = dep.autoscaling.costs
    since = {c.replica_id: c.since for c in cheaper_since}
    watch: list[CheaperSince] = []
    releases: list[tuple[ReplicaView, AgentView, str]] = []
    notes: list[str] = []
    ordered = sorted(rented, key=lambda ra: (-ra[1].usd_per_hour, ra[0].replica_id))
    for replica, agent in ordered:
        case = cases.get(replica.replica_id)
        if case is None or not case.cheaper:
            continue
        first = since.get(replica.replica_id, now)
        held = now - first
        if held >= costs.release_after_s and not releases:
            releases.append((replica, agent, f"{case.describe()} for {held:.0f}s; releasing"))
            continue
        watch.append(CheaperSince(replica.replica_id, first))
        if held < costs.release_after_s:
            notes.append(f"{case.describe()} for {held:.0f}s of {costs.release_after_s:g}s")
    return releases, watch, notes
