"""One scenario's numbers as plain data: latency, SLO attainment, costs, the gateway's counts.

Every scenario carries ``uses_reserved``, ``slo_attainment``, ``cost_usd.total`` and
``cost_usd.overflow`` (everything beyond the reservation: rented machines and managed
endpoints), so that the played scenarios and the computed hindsight bound read alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from simulator.cluster import MANAGED, REJECTED, RESERVED, SPILLED, Cluster
from simulator.probes import percentile
from simulator.scenarios import WITH_RESERVED, ScenarioResult, Setup
from simulator.settings import SimSettings

_SERVED = (RESERVED, SPILLED, MANAGED)


def _percentiles(sorted_values: Sequence[float]) -> dict[str, float]:
    return {f"p{q}": percentile(sorted_values, q) for q in (50, 90, 99)}


def slo_attainment(cluster: Cluster, slo_s: float) -> float:
    """Share of the trace's requests served with a time to first token within ``slo_s``
    (rejected requests, the gateway's refusals among them, count as misses)."""
    outcome, ttft = cluster.outcome, cluster.ttft
    n = len(outcome)
    if n == 0:
        return 1.0
    within = sum(1 for i in range(n) if outcome[i] in _SERVED and ttft[i] <= slo_s)
    return within / n


def summarize(result: ScenarioResult, setup: Setup, settings: SimSettings) -> dict[str, Any]:
    """The numbers of one scenario, as plain data (the JSON output and the table use them)."""
    c = result.cluster
    trace = c.trace
    outcome = c.outcome
    served = [i for i in range(len(trace)) if outcome[i] in _SERVED]
    ttft = sorted(c.ttft[i] for i in served)
    e2e = sorted(c.e2e[i] for i in served)
    slo = settings.ttft_slo_s
    on_reserved = sum(1 for i in served if outcome[i] == RESERVED)
    on_managed = sum(1 for i in served if outcome[i] == MANAGED)
    output_tokens = sum(trace.output_tokens[i] for i in served)
    rejected = sum(1 for i in range(len(trace)) if outcome[i] == REJECTED)
    lost = len(trace) - len(served) - rejected
    horizon = c.horizon
    reserved_busy = sum(
        r.model.busy_s * len(r.gpu_indices) for r in c.replicas.values() if not r.spilled
    )
    reserved_replicas = result.reserved_gpus // setup.dep.gpus
    violations = 0
    for replica in c.replicas.values():
        m = replica.machine
        inside = (
            setup.lock.allows_region(m.provider, m.region)
            if m.rented
            else setup.lock.allows_agent(m.residency_label)
        )
        if not inside:
            violations += replica.served
    for target in c.gateway.managed:
        if not setup.lock.allows_group(target.endpoint.residency_group):
            violations += target.served
    durations = [e.duration_s for e in result.episodes]
    total = result.cost_total
    g = c.gateway
    return {
        "scenario": result.name,
        "uses_reserved": result.name in WITH_RESERVED,
        "parameters": dict(result.parameters),
        "requests": len(trace),
        "served": len(served),
        "served_on_reserved": on_reserved,
        "served_on_rented": len(served) - on_reserved - on_managed,
        "served_on_managed": on_managed,
        "rejected": rejected,
        "rejections": dict(c.rejections),
        "lost": lost,
        "ttft_s": _percentiles(ttft),
        "e2e_s": _percentiles(e2e),
        "slo_ttft_s": slo,
        "slo_attainment": slo_attainment(c, slo),
        "output_tokens": output_tokens,
        "cost_usd": {
            "reserved": result.cost_reserved,
            "rented": result.cost_rented,
            "managed": result.cost_managed,
            "overflow": result.cost_overflow,
            "total": total,
        },
        "usd_per_million_output_tokens": total / output_tokens * 1e6 if output_tokens else None,
        "reserved_gpus": result.reserved_gpus,
        # The load the reserved replicas served, against what they finish flat out...
        "reserved_utilization": (
            on_reserved / (reserved_replicas * setup.replica_throughput_rps * horizon)
            if reserved_replicas and horizon > 0
            else None
        ),
        # ... and the share of time they were running an iteration (as nvidia-smi counts it).
        "reserved_busy": (
            min(1.0, reserved_busy / (result.reserved_gpus * horizon))
            if result.reserved_gpus and horizon > 0
            else None
        ),
        "rented_machines": sum(1 for m in c.machines.values() if m.rented),
        "peak_rented_machines": max((t.rented for t in c.ticks), default=0),
        "spill_episodes": {
            "count": len(result.episodes),
            "total_s": sum(durations),
            "mean_s": sum(durations) / len(durations) if durations else 0.0,
            "longest_s": max(durations, default=0.0),
        },
        "gateway": {
            "route_calls": g.route_calls,
            "queued": g.queued,
            "queue_timeouts": g.timeouts,
            "queue_full": g.queue_full,
            "peak_queue": g.peak_queue,
            "managed": {
                m.endpoint.name: {
                    "requests": m.served,
                    "input_tokens": m.input_tokens,
                    "output_tokens": m.output_tokens,
                    "cost_usd": m.cost_usd,
                }
                for m in g.managed
            },
        },
        "events": dict(Counter(event.kind for event in c.events)),
        "residency_violations": violations,
        "lock_errors": result.lock_errors,
        "decisions": result.plans or len(c.ticks),
        "wall_s": result.wall_s,
    }
