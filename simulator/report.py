"""What a simulation shows: a table, per-minute series, JSON and per-request rows (the PNG is
:mod:`simulator.figure`)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from simulator.cluster import MANAGED, REJECTED, RESERVED, SPILLED, Cluster
from simulator.probes import percentile
from simulator.scenarios import SLO_SHARE, ScenarioResult, billed_seconds

BUCKET_S = 60.0
OUTCOMES = {RESERVED: "reserved", SPILLED: "rented", REJECTED: "rejected", MANAGED: "managed"}
_SERVED = (RESERVED, SPILLED, MANAGED)
#: Computed, not a way to serve: shown, never ranked or called cheapest.
BOUND = "hindsight-bound"


def series(result: ScenarioResult, bucket_s: float = BUCKET_S) -> dict[str, list[Any]]:
    """Per-bucket demand, capacity, latency and spend of one scenario.

    Every key ending in ``_usd`` is money spent in that bucket, and together they add up to the
    scenario's total cost (the figure's cumulative cost sums them all): the reservation at its
    constant rate, and rented machines as they are billed (the rounding to the cloud's billing
    step and minimum falls in the bucket where the machine was given back)."""
    c = result.cluster
    buckets = max(1, math.ceil(c.horizon / bucket_s))
    arrivals = [0] * buckets
    ttfts: list[list[float]] = [[] for _ in range(buckets)]
    for i, at in enumerate(c.trace.arrivals):
        b = min(buckets - 1, int(at // bucket_s))
        arrivals[b] += 1
        if c.outcome[i] in _SERVED:
            ttfts[b].append(c.ttft[i])
    reserved = [0] * buckets
    rented = [0] * buckets
    spilled = [0] * buckets
    seen = [False] * buckets
    for tick in c.ticks:  # the last tick of each bucket stands for it
        b = min(buckets - 1, int(tick.at // bucket_s))
        reserved[b], spilled[b], rented[b] = tick.reserved, tick.spilled, tick.rented
        seen[b] = True
    for b in range(1, buckets):  # a bucket without a tick keeps the state before it
        if not seen[b]:
            reserved[b], spilled[b], rented[b] = reserved[b - 1], spilled[b - 1], rented[b - 1]
    p50, p99 = [], []
    for values in ttfts:
        values.sort()
        p50.append(_round(percentile(values, 50)))
        p99.append(_round(percentile(values, 99)))
    launches = [0] * buckets
    for event in c.events:
        if event.kind == "launch" and event.at < c.horizon:
            launches[min(buckets - 1, int(event.at // bucket_s))] += 1
    return {
        "t_s": [b * bucket_s for b in range(buckets)],
        "requests_per_s": [n / bucket_s for n in arrivals],
        "reserved_replicas": reserved,
        "rented_replicas": spilled,
        "rented_machines": rented,
        "launches": launches,
        "ttft_p50_s": p50,
        "ttft_p99_s": p99,
        "reserved_usd": _spread(result.cost_reserved, 0.0, c.horizon, buckets, bucket_s),
        "rented_usd": _rented_spend(c, buckets, bucket_s),
        "managed_usd": _managed_spend(c, buckets, bucket_s),
    }


def _managed_spend(c: Cluster, buckets: int, bucket_s: float) -> list[float]:
    """What the managed endpoints billed per bucket (each request when it was sent)."""
    out = [0.0] * buckets
    for at, usd, _ in c.gateway.spend:
        out[min(buckets - 1, int(at // bucket_s))] += usd
    return out


def _spread(usd: float, start: float, end: float, buckets: int, bucket_s: float) -> list[float]:
    """``usd`` spent evenly from ``start`` to ``end``, per bucket."""
    out = [0.0] * buckets
    if end <= start:
        return out
    rate = usd / (end - start)
    for b in range(min(buckets - 1, int(start // bucket_s)), buckets):
        low = max(start, b * bucket_s)
        if low >= end:
            break
        high = end if b == buckets - 1 else min(end, (b + 1) * bucket_s)
        out[b] += (high - low) * rate
    return out


def _rented_spend(c: Cluster, buckets: int, bucket_s: float) -> list[float]:
    """What the rented machines cost per bucket, as :func:`simulator.scenarios.rented_cost`
    adds it up."""
    out = [0.0] * buckets
    for machine in c.machines.values():
        if not machine.rented or machine.launched_at >= c.horizon:
            continue
        end = machine.terminated_at
        ended = end is not None and end <= c.horizon
        if end is None or not ended:
            end = c.horizon
        held = end - machine.launched_at
        per_s = machine.usd_per_hour / 3600
        for b, usd in enumerate(_spread(held * per_s, machine.launched_at, end, buckets, bucket_s)):
            out[b] += usd
        billed = billed_seconds(c.settings, machine.provider, held, ended)
        out[min(buckets - 1, int(end // bucket_s))] += (billed - held) * per_s
    return out


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def _holds(s: Mapping[str, Any], share: float) -> bool:
    return bool(s["slo_attainment"] >= share - 1e-12)


def ranking(
    summaries: Mapping[str, dict[str, Any]],
    hours: float,
    reserved_usd_per_gpu_hour: float,
    slo_share: float = SLO_SHARE,
) -> list[dict[str, Any]]:
    """Every scenario but the bound, those holding the SLO first, cheapest first, with reserved
    GPUs priced at ``reserved_usd_per_gpu_hour``."""
    rows = []
    for name, s in summaries.items():
        if name == BOUND:
            continue
        cost = s["cost_usd"]
        total = s["reserved_gpus"] * hours * reserved_usd_per_gpu_hour + cost["overflow"]
        rows.append(
            {
                "scenario": name,
                "holds_slo": _holds(s, slo_share),
                "uses_reserved": s["uses_reserved"],
                "total_usd": total,
            }
        )
    rows.sort(key=lambda r: (not r["holds_slo"], r["total_usd"], r["scenario"]))
    for place, row in enumerate(rows, 1):
        row["place"] = place
    return rows


def comparison(
    summaries: Mapping[str, dict[str, Any]],
    slo_share: float = SLO_SHARE,
    *,
    hours: float = 0.0,
    reserved_usd_per_gpu_hour: float = 0.0,
    on_demand_usd_per_gpu_hour: float = 0.0,
) -> dict[str, Any]:
    """Which scenarios hold the SLO, which of those is cheapest (overall, with the reservation,
    without it), the ratios to the policy, the policy's overflow against the hindsight bound,
    and the ranking at the configured reserved price and with no discount at all."""
    real = {n: s for n, s in summaries.items() if n != BOUND}
    holding = {name: s for name, s in real.items() if _holds(s, slo_share)}

    def cheapest_of(names: list[str]) -> str | None:
        return min(names, key=lambda n: holding[n]["cost_usd"]["total"]) if names else None

    cheapest = cheapest_of(list(holding))
    policy = summaries.get("policy")
    ratios = {}
    if policy is not None and policy["cost_usd"]["total"] > 0:
        for name, s in summaries.items():
            ratios[name] = s["cost_usd"]["total"] / policy["cost_usd"]["total"]
    runner_up = None
    saving = None
    if cheapest is not None:
        others = {n: s["cost_usd"]["total"] for n, s in holding.items() if n != cheapest}
        if others:
            runner_up = min(others, key=lambda n: others[n])
            if others[runner_up] > 0:
                saving = 1 - holding[cheapest]["cost_usd"]["total"] / others[runner_up]
    bound = summaries.get(BOUND)
    vs_bound: float | None = None
    if policy is not None and bound is not None:
        b = bound["cost_usd"]["overflow"]
        p = policy["cost_usd"]["overflow"]
        if b > 0:
            vs_bound = p / b
        elif p == 0:
            vs_bound = 1.0
    discount = (
        1 - reserved_usd_per_gpu_hour / on_demand_usd_per_gpu_hour
        if on_demand_usd_per_gpu_hour > 0
        else 0.0
    )
    return {
        "slo_share": slo_share,
        "holding_slo": sorted(holding),
        "cheapest_holding_slo": cheapest,
        "next_cheapest_holding_slo": runner_up,
        #: What the cheapest saves against the next cheapest that also holds (0.4: 40% less).
        "saving_vs_next": saving,
        "cheapest_with_reserved_holding_slo": cheapest_of(
            [n for n in holding if holding[n]["uses_reserved"]]
        ),
        "cheapest_without_reserved_holding_slo": cheapest_of(
            [n for n in holding if not holding[n]["uses_reserved"]]
        ),
        #: The policy's overflow cost over the bound's (None: the bound spends nothing and the
        #: policy does).
        "policy_overflow_vs_hindsight_bound": vs_bound,
        "cost_vs_policy": ratios,
        "ranking": {
            "reserved_discount": discount,
            "at_reserved_discount": ranking(summaries, hours, reserved_usd_per_gpu_hour, slo_share),
            "at_no_discount": ranking(summaries, hours, on_demand_usd_per_gpu_hour, slo_share),
        },
    }


def verdict(c: Mapping[str, Any]) -> str:
    """One line from :func:`comparison`: the cheapest scenario that holds, and by how much."""
    cheapest = c["cheapest_holding_slo"]
    share = f"{c['slo_share'] * 100:g}%"
    if cheapest is None:
        return f"no scenario kept {share} of requests within the TTFT target"
    line = f"cheapest scenario keeping {share} of requests within the TTFT target: {cheapest}"
    saving, runner_up = c["saving_vs_next"], c["next_cheapest_holding_slo"]
    if saving is not None and saving < 0.0005:
        line += f" ({runner_up} costs the same)"
    elif saving is not None:
        line += f", {saving * 100:.1f}% less than the next, {runner_up}"
    return line


def ranking_lines(c: Mapping[str, Any]) -> list[str]:
    """The ranking at the configured reserved discount and at none, one line each."""
    r = c.get("ranking")
    if not r:
        return []
    lines = []
    for key, label in (
        ("at_reserved_discount", f"reserved at a {r['reserved_discount'] * 100:.0f}% discount"),
        ("at_no_discount", "reserved at the on-demand price (0% discount)"),
    ):
        order = ", ".join(
            f"{row['place']}. {row['scenario']} ${row['total_usd']:,.2f}"
            + ("" if row["holds_slo"] else " (misses)")
            for row in r[key]
        )
        lines.append(f"ranking, {label}: {order}")
    bound = c.get("policy_overflow_vs_hindsight_bound")
    if bound is not None:
        lines.append(f"policy's overflow cost: {bound:.2f}x the hindsight bound's")
    return lines


def table(summaries: Mapping[str, dict[str, Any]], title: str) -> Table:
    out = Table(title=title)
    columns = (
        "scenario",
        "TTFT p50",
        "TTFT p99",
        "SLO met",
        "reserved $",
        "rented $",
        "managed $",
        "overflow $",
        "total $",
        "x policy",
        "res. util",
        "spills",
        "rejected",
    )
    for index, column in enumerate(columns):
        out.add_column(column, justify="left" if index == 0 else "right")
    policy_total = summaries.get("policy", {}).get("cost_usd", {}).get("total")
    for name, s in summaries.items():
        cost = s["cost_usd"]
        util = s.get("reserved_utilization")
        ttft = s.get("ttft_s", {})
        spills = s.get("spill_episodes", {}).get("count")
        rejected = s.get("rejected", s.get("missed"))
        out.add_row(
            name,
            _seconds(ttft.get("p50")),
            _seconds(ttft.get("p99")),
            f"{s['slo_attainment'] * 100:.2f}%",
            f"{cost['reserved']:,.2f}",
            f"{cost['rented']:,.2f}",
            f"{cost['managed']:,.2f}",
            f"{cost['overflow']:,.2f}",
            f"{cost['total']:,.2f}",
            f"{cost['total'] / policy_total:.2f}" if policy_total else "-",
            "-" if util is None else f"{util * 100:.0f}%",
            "-" if spills is None else str(spills),
            "-" if rejected is None else f"{rejected:,.0f}",
        )
    return out


def _seconds(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}s"


def write_requests(path: Path, results: Sequence[ScenarioResult]) -> None:
    """One row per request and scenario: when it came, what it asked, how it went."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "scenario",
                "request",
                "arrival_s",
                "input_tokens",
                "output_tokens",
                "outcome",
                "ttft_s",
                "e2e_s",
            ]
        )
        for result in results:
            c = result.cluster
            t = c.trace
            for i in range(len(t)):
                outcome = c.outcome[i]
                served = outcome in (RESERVED, SPILLED)
                writer.writerow(
                    [
                        result.name,
                        i,
                        f"{t.arrivals[i]:.4f}",
                        t.input_tokens[i],
                        t.output_tokens[i],
                        OUTCOMES.get(outcome, "lost"),
                        f"{c.ttft[i]:.4f}" if served else "",
                        f"{c.e2e[i]:.4f}" if served else "",
                    ]
                )


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
