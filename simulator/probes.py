"""Load probes: how much one replica holds, and how many replicas a steady load needs.

Each probe plays Poisson arrivals with the trace's request sizes through
:class:`~agent.runtimes.simulated_model.BatchingModel` replicas (shortest queue first) and asks
whether the 99th percentile of time to first token stays within the target. The simulator uses
them to size reserved GPUs "near the mean load", and to start the search for the on-demand
baseline's target requests per second per replica from what a load test of one replica shows.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence

from agent.runtimes.simulated_model import BatchingModel, GpuProfile, Progress, RequestRejected
from simulator.trace import Trace


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` (0..100) percentile of sorted values, nearest rank; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def request_sizes(trace: Trace, seed: int, limit: int = 20_000) -> list[tuple[int, int]]:
    """Request sizes spread evenly over the whole trace (a looped trace gives the same ones),
    in a seeded random order."""
    step = max(1, len(trace) // limit)
    sizes = [(trace.input_tokens[i], trace.output_tokens[i]) for i in range(0, len(trace), step)]
    random.Random(seed).shuffle(sizes)
    return sizes


def holds_target(
    profile: GpuProfile,
    sizes: Sequence[tuple[int, int]],
    rate: float,
    replicas: int,
    slo_s: float,
    seed: int,
    requests: int,
    fast_forward: bool = True,
) -> bool:
    """Do ``replicas`` replicas, sent the shortest queue's way, keep p99 time to first token
    within ``slo_s`` under ``requests`` Poisson arrivals at ``rate`` with these sizes?"""
    probe = random.Random(seed + 1)
    models = [BatchingModel(profile, fast_forward=fast_forward) for _ in range(replicas)]
    ttfts: list[float] = []
    # More misses than the p99 of every request allows: the answer is no, whatever follows.
    allowed = requests - math.ceil(0.99 * requests)
    misses = 0

    def collect(updates: list[Progress]) -> None:
        nonlocal misses
        for p in updates:
            if p.finished and p.first_token_at is not None:
                ttft = p.first_token_at - p.arrived_at
                ttfts.append(ttft)
                misses += ttft > slo_s

    now = 0.0
    for index in range(requests):
        if misses > allowed:
            return False
        now += probe.expovariate(rate)
        for model in models:
            collect(model.advance(now))
        prompt, new = sizes[index % len(sizes)]
        target = min(models, key=lambda m: m.in_flight)
        try:
            target.submit(str(index), prompt, new, now)
        except RequestRejected:
            continue
    for model in models:
        collect(model.advance(math.inf))
    ttfts.sort()
    return bool(ttfts) and percentile(ttfts, 99) <= slo_s


def replica_throughput(profile: GpuProfile, sizes: Sequence[tuple[int, int]]) -> float:
    """Requests per second one replica finishes flat out with these request sizes: each
    request costs its prefill and its share of every decode step of a full batch."""
    mean_in = sum(s[0] for s in sizes) / len(sizes)
    mean_out = sum(s[1] for s in sizes) / len(sizes)
    busy = mean_in / profile.prefill_tokens_per_s + mean_out * profile.decode_step_per_request_s
    return 1 / busy


def replica_capacity(
    profile: GpuProfile,
    sizes: Sequence[tuple[int, int]],
    slo_s: float,
    seed: int,
    requests: int,
    fast_forward: bool = True,
) -> float:
    """Requests per second one replica serves with p99 time to first token within ``slo_s``,
    for these request sizes (Poisson arrivals, bisection on the rate): what a load test of
    one replica shows. The same question twice in one process is answered once."""
    return _capacity(profile, tuple(sizes), slo_s, seed, requests, fast_forward)


@functools.lru_cache(maxsize=16)
def _capacity(
    profile: GpuProfile,
    sizes: tuple[tuple[int, int], ...],
    slo_s: float,
    seed: int,
    requests: int,
    fast_forward: bool,
) -> float:
    low, high = 0.0, 1.5 * replica_throughput(profile, sizes)
    for _ in range(7):  # to within 1% of the ceiling
        middle = (low + high) / 2
        if holds_target(profile, sizes, middle, 1, slo_s, seed, requests, fast_forward):
            low = middle
        else:
            high = middle
    return low


def replicas_for_mean_load(
    profile: GpuProfile,
    sizes: Sequence[tuple[int, int]],
    rate: float,
    slo_s: float,
    seed: int,
    requests: int,
    fast_forward: bool = True,
    limit: int = 256,
) -> int:
    """The fewest replicas that keep the TTFT target at a steady ``rate`` (the trace's mean):
    reserved capacity "near the mean load" (bursts above the mean are what spilling is for)."""
    for replicas in range(1, limit + 1):
        if holds_target(profile, sizes, rate, replicas, slo_s, seed, requests, fast_forward):
            return replicas
    return limit
