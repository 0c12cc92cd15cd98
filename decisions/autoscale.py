"""Autoscaling: how many replicas a deployment should have, from its load over time.

Scale up only after the signal stayed above the target for the whole scale-up window (and
since the last change, so replicas just added get a chance to take load); scale down only after
it stayed below the low-water mark for the cool-down. A sample's value holds until the next
sample, so the sample that opens a window must pass too. Between the two marks nothing changes
(hysteresis). Steps are bounded by ``max_step_up``/``max_step_down``; the result is always
within ``min_replicas``..``max_replicas``.

The gateways give a faster signal too (:func:`fast_signal`): a request waiting longer than
``slo.saturated_queue_age`` x ``slo.ttft_s``, or requests waiting while no replica has room,
is saturation now, not after a window; traffic sent to managed endpoints is overflow now.
The planning step acts on both on the tick that sees them.

Pure functions: no I/O and no clocks. ``now`` and the samples (with their times) are inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from decisions.costs import DEFAULT_REPLICA_CONCURRENCY
from decisions.fleetview import FleetSnapshot
from decisions.policy import Deployment


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    #: The deployment's signal: mean per healthy replica (or KV-cache use), or a total over
    #: the deployment's gateways.
    value: float


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    deployment: str
    current: int
    desired: int
    reason: str

    @property
    def change(self) -> int:
        return self.desired - self.current


def signal(deployment: str, dep: Deployment, snapshot: FleetSnapshot) -> float | None:
    """The deployment's signal now.

    The per-replica signals are None when no healthy replica reports load. The gateway
    signals (``queued_at_gateway``: requests waiting in all gateways' queues together;
    ``overflow_tokens_per_s``: tokens per second all gateways send to managed endpoints) are
    totals, not per replica, and always have a value (0.0 when no gateway reports): with no
    healthy replica at all they are what can scale a deployment up from zero.
    """
    kind = dep.autoscaling.signal
    if kind == "queued_at_gateway" or kind == "overflow_tokens_per_s":
        load = snapshot.gateway.get(deployment)
        if load is None:
            return 0.0
        if kind == "queued_at_gateway":
            return float(load.queue_depth)
        return load.overflow_tokens_per_s
    healthy = [r for r in snapshot.replicas if r.deployment == deployment and r.healthy]
    if not healthy:
        return None
    if kind == "queued_per_replica":
        return sum(r.queued_requests for r in healthy) / len(healthy)
    if kind == "running_per_replica":
        return sum(r.running_requests for r in healthy) / len(healthy)
    return sum(r.kv_cache_usage for r in healthy) / len(healthy)


@dataclass(frozen=True, slots=True)
class FastSignal:
    """What the gateways say of a deployment now, judged against its SLO."""

    #: Why the deployment is saturated now (requests wait too long, or with no room
    #: anywhere); empty when it is not.
    saturated: str = ""
    #: Replicas the waiting requests would fill (at least 1 when saturated).
    wanted: int = 0
    queue_depth: int = 0
    oldest_queued_s: float = 0.0
    #: Tokens per second going to managed endpoints now.
    overflow_tokens_per_s: float = 0.0


def replica_concurrency(dep: Deployment) -> int:
    """Requests one replica takes at once, as the gateway caps it (or the default)."""
    return dep.gateway.max_concurrency_per_replica or DEFAULT_REPLICA_CONCURRENCY


def fast_signal(deployment: str, dep: Deployment, snapshot: FleetSnapshot) -> FastSignal:
    """Saturation and overflow now, from the gateways' report (no window).

    Saturated when the oldest request waiting at any gateway is older than
    ``slo.saturated_queue_age * slo.ttft_s``, or when requests wait while no replica has
    room: no healthy replica at all, or every healthy one at
    ``gateway.max_concurrency_per_replica`` (when set) by the gateways' in-flight counts.
    """
    load = snapshot.gateway.get(deployment)
    if load is None:
        return FastSignal()
    depth, oldest = load.queue_depth, load.oldest_queued_s
    limit = dep.slo.saturated_after_s
    cap = dep.gateway.max_concurrency_per_replica
    healthy = [r for r in snapshot.replicas if r.deployment == deployment and r.healthy]
    why = ""
    if depth > 0 and oldest > limit:
        why = (
            f"{depth} queued at the gateways, the oldest for {oldest:.2f}s > {limit:.2f}s "
            f"({dep.slo.saturated_queue_age:g} x {dep.slo.ttft_s:g}s TTFT)"
        )
    elif depth > 0 and not healthy:
        why = f"{depth} queued at the gateways and no healthy replica"
    elif (
        depth > 0
        and cap is not None
        and all(load.in_flight.get(r.replica_id, 0) >= cap for r in healthy)
    ):
        why = f"{depth} queued at the gateways and every replica at its {cap} in flight"
    wanted = max(1, math.ceil(depth / replica_concurrency(dep))) if why else 0
    return FastSignal(why, wanted, depth, oldest, load.overflow_tokens_per_s)


def decide(
    name: str,
    dep: Deployment,
    current: int,
    samples: Sequence[Sample],
    now: float,
    last_change_at: float | None = None,
) -> ScaleDecision:
    """The replica count ``name`` should have now, and why."""
    scaling = dep.autoscaling
    low, high = dep.min_replicas, dep.max_replicas
    if current < low:
        return ScaleDecision(name, current, low, f"below min_replicas ({low})")
    if current > high:
        return ScaleDecision(name, current, high, f"above max_replicas ({high})")
    since = last_change_at if last_change_at is not None else -math.inf

    def sustained(window: float, test: str) -> tuple[bool, list[float]]:
        # A sample's value holds until the next one, so the window is covered from its start
        # only when the newest sample at or before the start already passed the test.
        start = now - window
        before = [s for s in samples if s.at <= start]
        if not before or since > start:
            return False, []
        anchor = max(before, key=lambda s: s.at)
        values = [anchor.value, *(s.value for s in samples if start < s.at <= now)]
        if test == "up":
            return all(v > scaling.target for v in values), values
        return all(v < scaling.low_water for v in values), values

    up, values = sustained(dep.spillover.scale_up_window_s, "up")
    if up:
        if current >= high:
            return ScaleDecision(name, current, current, f"saturated but at max_replicas ({high})")
        mean = sum(values) / len(values)
        wanted = max(current + 1, math.ceil(max(current, 1) * mean / scaling.target))
        desired = min(high, current + scaling.max_step_up, wanted)
        return ScaleDecision(
            name,
            current,
            desired,
            f"{scaling.signal} over {scaling.target:g} for {dep.spillover.scale_up_window_s:g}s "
            f"(mean {mean:.2f}); +{desired - current} (at most {scaling.max_step_up} a step)",
        )
    down, values = sustained(dep.spillover.cool_down_s, "down")
    if down and current > low:
        desired = max(low, current - scaling.max_step_down)
        return ScaleDecision(
            name,
            current,
            desired,
            f"{scaling.signal} under {scaling.low_water:g} for {dep.spillover.cool_down_s:g}s; "
            f"-{current - desired}",
        )
    return ScaleDecision(
        name,
        current,
        current,
        f"holding: {scaling.signal} not beyond {scaling.low_water:g}..{scaling.target:g} "
        "for a whole window",
    )
