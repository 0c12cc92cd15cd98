"""The hindsight bound: the cheapest way to serve the overflow beyond the same reserved GPUs,
knowing the whole trace in advance.

Computed, not played. Time is cut into steps of ``hindsight_bucket_s`` seconds. In each step
the reserved replicas serve up to what one replica of the same replica model finishes flat out
(``replica_throughput_rps``: each request's prefill and its share of full decode batches, for
the trace's request sizes), times their number: more than any replica serves within the TTFT
target, so that the bound stays a bound; what arrives beyond that is overflow. The overflow of
a step can go

- to rented replicas (each serves up to the same rate), billed for the step at the cheapest
  offer inside the lock; a rented replica added is paid for its whole cold start before it
  (launch call, boot, weight download, replica start: it was started exactly one cold start
  ahead, because the future is known), and nothing when it is let go;
- to the managed endpoints inside the lock, cheapest first, each up to its concurrency over the
  step's mean service time, at the step's mean cost per request;
- nowhere: a miss. The SLO allows ``1 - 0.99`` of the requests to miss.

The cheapest plan is a shortest path over (step, rented replicas) (dynamic programming: the
number of rented replicas is the state, adding one costs its cold start), with each miss priced
at ``λ``; ``λ`` is raised (bisection) until the plan's misses fit in what the SLO allows (a
Lagrangian relaxation of the miss budget); what is left of the budget then drops the dearest
managed requests. The plan's money (reserved, rented, managed) is the bound; where no plan fits
(too little rentable and managed capacity), the plan with the fewest misses is reported with
its attainment.

Simplifications, all in the bound's favour (it is meant to be at or below what any controller
can do): requests are fluid within a step, a rental's billing minimum and rounding are ignored
beyond its cold start, and capacity errors never happen.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from typing import Any

from decisions.endpoints import ManagedEndpoint
from simulator.scenarios import SLO_SHARE, Setup, miss_budget
from simulator.settings import SimSettings
from simulator.trace import Trace


@dataclass(frozen=True)
class _Step:
    arrivals: int
    overflow: float
    #: Per managed endpoint (cheapest first): (requests it can take, cost per request).
    managed: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Plan:
    cost_rented: float
    cost_managed: float
    misses: float
    on_rented: float
    on_managed: float
    peak_rented: int
    rentals: int
    #: (USD per request, requests) sent to managed endpoints, per step and endpoint.
    managed_parts: tuple[tuple[float, float], ...] = ()

    def spend_misses(self, allowed: float) -> Plan:
        """The plan with up to ``allowed`` more misses, taken from the dearest managed
        requests (the miss budget the Lagrangian price left unused)."""
        left = allowed - self.misses
        if left <= 0:
            return self
        saved = dropped = 0.0
        for usd, count in sorted(self.managed_parts, reverse=True):
            if left <= 0:
                break
            take = min(count, left)
            saved += take * usd
            dropped += take
            left -= take
        return replace(
            self,
            cost_managed=self.cost_managed - saved,
            misses=self.misses + dropped,
            on_managed=self.on_managed - dropped,
        )


def reserved_replicas(setup: Setup) -> int:
    if setup.reserved_pool not in setup.dep.pools:
        return 0
    per = max(1, setup.gpus_per_machine // setup.dep.gpus)
    return min(setup.reserved_machines * per, setup.dep.max_replicas)


def cold_start_s(setup: Setup, settings: SimSettings) -> float:
    """Launch call to replica healthy on the cheapest offer inside the lock."""
    if not setup.offers:
        return 0.0
    cloud = settings.cloud(setup.offers[0].cloud)
    prefetch = setup.weights_bytes / (settings.prefetch_mb_per_s * 1e6)
    return settings.launch_call_s + cloud.boot_s + prefetch + settings.replica_start_s


def _steps(
    setup: Setup, trace: Trace, settings: SimSettings, reserved: int, bucket: float
) -> list[_Step]:
    count = max(1, math.ceil(trace.duration_s / bucket - 1e-9))
    capacity = reserved * setup.replica_throughput_rps * bucket
    p = setup.profile
    endpoints: list[ManagedEndpoint] = sorted(
        setup.managed, key=lambda e: (e.usd_per_million_output_tokens, e.name)
    )
    out: list[_Step] = []
    arrivals = trace.arrivals
    for b in range(count):
        lo = bisect.bisect_left(arrivals, b * bucket)
        hi = bisect.bisect_left(arrivals, (b + 1) * bucket) if b + 1 < count else len(trace)
        n = hi - lo
        overflow = max(0.0, n - capacity)
        managed: list[tuple[float, float]] = []
        if n and overflow > 0:
            ins = trace.input_tokens[lo:hi]
            outs = trace.output_tokens[lo:hi]
            mean_in, mean_out = sum(ins) / n, sum(outs) / n
            for e in endpoints:
                ttft = p.prefill_step_s + mean_in / p.prefill_tokens_per_s + e.added_latency_s
                if ttft > settings.ttft_slo_s:
                    continue  # its answers would miss the target anyway
                service = ttft + max(0.0, mean_out - 1) / settings.managed_output_tokens_per_s
                managed.append((e.max_concurrency * bucket / service, _usd(e, mean_in, mean_out)))
        out.append(_Step(n, overflow, tuple(managed)))
    return out


def _usd(e: ManagedEndpoint, input_tokens: float, output_tokens: float) -> float:
    return (
        input_tokens * e.usd_per_million_input_tokens
        + output_tokens * e.usd_per_million_output_tokens
    ) / 1e6


def _step_cost(
    step: _Step,
    rented: int,
    per_replica: float,
    price_step: float,
    miss_usd: float,
    parts: list[tuple[float, float]] | None = None,
) -> tuple[float, float, float, float, float]:
    """(cost with misses priced, rented money, managed money, misses, on managed); what goes
    to managed endpoints is added to ``parts``."""
    rent_money = rented * price_step
    left = max(0.0, step.overflow - rented * per_replica)
    managed_money = 0.0
    on_managed = 0.0
    for room, usd in step.managed:
        if left <= 0 or usd > miss_usd:
            break
        take = min(room, left)
        managed_money += take * usd
        on_managed += take
        left -= take
        if parts is not None and take > 0:
            parts.append((usd, take))
    return rent_money + managed_money + left * miss_usd, rent_money, managed_money, left, on_managed


def _plan(
    steps: list[_Step],
    most: int,
    per_replica: float,
    price_step: float,
    start_usd: float,
    miss: float,
) -> Plan:
    states = most + 1
    inf = math.inf
    best = [0.0] + [inf] * most  # before the first step: nothing rented
    back: list[list[int]] = []
    for step in steps:
        costs = [_step_cost(step, k, per_replica, price_step, miss)[0] for k in range(states)]
        new = [inf] * states
        came = [0] * states
        for k in range(states):
            for j in range(states):
                if best[j] == inf:
                    continue
                value = best[j] + max(0, k - j) * start_usd
                if value < new[k]:
                    new[k], came[k] = value, j
            new[k] += costs[k]
        back.append(came)
        best = new
    k = min(range(states), key=lambda s: best[s])
    path = [0] * len(steps)
    for index in range(len(steps) - 1, -1, -1):
        path[index] = k
        k = back[index][k]
    rented = managed = misses = on_rented = on_managed = 0.0
    rentals = 0
    previous = 0
    parts: list[tuple[float, float]] = []
    for step, k in zip(steps, path, strict=True):
        _, r, m, x, om = _step_cost(step, k, per_replica, price_step, miss, parts)
        rented += r + max(0, k - previous) * start_usd
        rentals += max(0, k - previous)
        managed += m
        misses += x
        on_managed += om
        on_rented += min(step.overflow, k * per_replica)
        previous = k
    return Plan(
        rented,
        managed,
        misses,
        on_rented,
        on_managed,
        max(path, default=0),
        rentals,
        tuple(parts),
    )


def hindsight_bound(setup: Setup, trace: Trace, settings: SimSettings) -> dict[str, Any]:
    """The bound as a scenario summary (the fields every scenario carries, and how)."""
    bucket = settings.hindsight_bucket_s
    reserved = reserved_replicas(setup)
    dep = setup.dep
    most = 0
    price = 0.0
    if dep.spillover.enabled and setup.offers:
        price = setup.offers[0].usd_per_hour
        most = min(dep.spillover.max_spilled_replicas, max(0, dep.max_replicas - reserved))
        cap = dep.spillover.max_usd_per_hour
        if cap is not None and price > 0:
            most = min(most, int(cap // price))
    per_replica = setup.replica_throughput_rps * bucket
    cold = cold_start_s(setup, settings)
    start_usd = price * cold / 3600
    price_step = price * bucket / 3600
    steps = _steps(setup, trace, settings, reserved, bucket)
    budget = miss_budget(trace)
    plan = _plan(steps, most, per_replica, price_step, start_usd, 1e9)
    if plan.misses <= budget + 1e-9:
        low, high = -9.0, 9.0  # log10 of the price of a miss, USD
        for _ in range(24):  # the smallest price of a miss whose plan fits the budget
            middle = (low + high) / 2
            trial = _plan(steps, most, per_replica, price_step, start_usd, 10**middle)
            if trial.misses <= budget + 1e-9:
                high, plan = middle, trial
            else:
                low = middle
        plan = plan.spend_misses(budget)
    hours = trace.duration_s / 3600
    cost_reserved = setup.reserved_gpus * hours * setup.reserved_usd_per_gpu_hour
    overflow = plan.cost_rented + plan.cost_managed
    n = len(trace)
    attainment = 1.0 - plan.misses / n if n else 1.0
    how = (
        f"computed, not played: {bucket:g}s steps; {reserved} reserved replicas hold "
        f"{setup.replica_throughput_rps:.2f} requests/s each (flat out); overflow to "
        f"up to {most} rented replicas at ${price:.2f}/h started one cold start "
        f"({cold:.0f}s, paid) ahead, or to managed endpoints by price and concurrency, or "
        f"missed within the {1 - SLO_SHARE:.0%} the SLO allows; cheapest plan by dynamic "
        "programming with misses priced (Lagrangian)"
    )
    return {
        "scenario": "hindsight-bound",
        "uses_reserved": True,
        "computed": True,
        "how": how,
        "requests": n,
        "served_on_reserved": n - plan.on_rented - plan.on_managed - plan.misses,
        "served_on_rented": plan.on_rented,
        "served_on_managed": plan.on_managed,
        "missed": plan.misses,
        "slo_ttft_s": settings.ttft_slo_s,
        "slo_attainment": attainment,
        "cost_usd": {
            "reserved": cost_reserved,
            "rented": plan.cost_rented,
            "managed": plan.cost_managed,
            "overflow": overflow,
            "total": cost_reserved + overflow,
        },
        "reserved_gpus": setup.reserved_gpus,
        "peak_rented_replicas": plan.peak_rented,
        "rentals": plan.rentals,
        "cold_start_s": cold,
    }
