"""Run every scenario on one trace, the baselines' searches on the tuning data, and gather
everything they show."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import simulator.report as report
from decisions.policy import Policy
from providers.catalog import Catalog
from simulator.figure import plot  # the PNG
from simulator.hindsight import hindsight_bound
from simulator.scenarios import (
    SCENARIOS,
    ScenarioResult,
    Setup,
    SimulationError,
    prepare,
    run_scenario,
)
from simulator.searches import Search, on_demand_target, peak_reservation
from simulator.settings import SimSettings
from simulator.summary import summarize
from simulator.trace import Trace


@dataclass
class Simulation:
    setup: Setup
    settings: SimSettings
    trace: Trace
    results: dict[str, ScenarioResult]
    summaries: dict[str, dict[str, Any]]
    comparison: dict[str, Any]
    wall_s: float
    searches: dict[str, Search] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    _data: dict[str, Any] | None = field(default=None, repr=False)

    def data(self) -> dict[str, Any]:
        """Everything, as JSON-ready data (built once)."""
        if self._data is None:
            self._data = self._build_data()
        return self._data

    def _build_data(self) -> dict[str, Any]:
        s = self.setup
        return {
            "trace": {
                "source": self.trace.source,
                "requests": len(self.trace),
                "duration_s": self.trace.duration_s,
                "mean_requests_per_s": self.trace.mean_rate(),
            },
            "deployment": {
                "name": s.deployment,
                "model": s.dep.model,
                "sku": s.dep.sku,
                "gpus_per_replica": s.dep.gpus,
                "params_b": s.params_b,
                "weights_gb": s.weights_bytes / 1e9,
                "lock": s.lock.name,
                "replica_profile": {
                    "name": s.profile.name,
                    "max_running_requests": s.profile.max_running_requests,
                    "max_total_tokens": s.profile.max_total_tokens,
                    "prefill_tokens_per_s": s.profile.prefill_tokens_per_s,
                    "decode_step_base_s": s.profile.decode_step_base_s,
                    "decode_step_per_request_s": s.profile.decode_step_per_request_s,
                },
                "replica_capacity_requests_per_s": s.replica_capacity_rps,
            },
            "reserved": {
                "machines": s.reserved_machines,
                "gpus_per_machine": s.gpus_per_machine,
                "pool": s.reserved_pool,
                "residency_label": s.reserved_label,
                "usd_per_gpu_hour": s.reserved_usd_per_gpu_hour,
            },
            "on_demand_usd_per_gpu_hour": s.on_demand_usd_per_gpu_hour,
            "on_demand_target_qps_per_replica": s.target_qps_per_replica,
            "tuning": self.tuning,
            "searches": {name: search.data() for name, search in self.searches.items()},
            "settings": self.settings.model_dump(mode="json"),
            "notes": list(s.notes),
            "scenarios": self.summaries,
            "comparison": self.comparison,
            "series": {name: report.series(r) for name, r in self.results.items()},
            "spill_episodes": {
                name: [{"start_s": e.start, "end_s": e.end} for e in r.episodes]
                for name, r in self.results.items()
            },
            "events": {
                name: [
                    {
                        "at_s": round(e.at, 3),
                        "kind": e.kind,
                        "replica": e.replica_id,
                        "text": e.text,
                    }
                    for e in r.cluster.events
                ]
                for name, r in self.results.items()
            },
            "wall_s": self.wall_s,
        }

    def write(self, out_dir: Path, *, requests: bool = True, png: bool = True) -> list[Path]:
        """Write ``simulation.json``, ``simulation.png`` and ``requests.csv`` into ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        data = self.data()
        written = [out_dir / "simulation.json"]
        report.write_json(written[0], data)
        if png:
            path = out_dir / "simulation.png"
            plot(
                path,
                data["series"],
                self.results,
                self.settings.ttft_slo_s,
                self.title(),
                summaries=self.summaries,
            )
            written.append(path)
        if requests:
            path = out_dir / "requests.csv"
            report.write_requests(path, list(self.results.values()))
            written.append(path)
        return written

    def title(self) -> str:
        s = self.setup
        hours = self.trace.duration_s / 3600
        return (
            f"{s.deployment}: {len(self.trace):,} requests over {hours:.1f} h, "
            f"{s.reserved_gpus} reserved {s.dep.sku}, TTFT target {self.settings.ttft_slo_s:g}s"
        )


def tuning_window(trace: Trace, hour: int) -> Trace:
    """Hour ``hour`` (1 is the first) of ``trace``, its times from 0: tuning data."""
    import bisect
    from array import array

    start, end = (hour - 1) * 3600.0, hour * 3600.0
    if hour < 1 or start >= trace.duration_s:
        hours = trace.duration_s / 3600
        raise SimulationError(
            f"--tune-on hour:{hour}: the trace lasts {hours:.2f} h; expected an hour from 1 "
            f"to {max(1, math.ceil(hours - 1e-9))}"
        )
    lo = bisect.bisect_left(trace.arrivals, start)
    hi = bisect.bisect_left(trace.arrivals, end)
    return Trace(
        array("d", (t - start for t in trace.arrivals[lo:hi])),
        trace.input_tokens[lo:hi],
        trace.output_tokens[lo:hi],
        min(end, trace.duration_s) - start,
        f"{trace.source} (hour {hour})",
    )


def simulate(
    policy: Policy,
    trace: Trace,
    settings: SimSettings | None = None,
    *,
    deployment: str | None = None,
    catalog: Catalog | None = None,
    scenarios: tuple[str, ...] = SCENARIOS,
    tune_on: Trace | None = None,
    tune_label: str = "",
) -> Simulation:
    """Play ``trace`` through each scenario and compare them.

    The baselines' searches (``reserved-for-peak``'s reservation, ``on-demand``'s target) run
    on ``tune_on`` when given (another trace, or another hour: ``tune_label`` says which),
    else on ``trace`` itself, and then the result says they were tuned on the scored data.
    """
    settings = settings or SimSettings()
    started = time.perf_counter()
    named = deployment or (next(iter(policy.deployments)) if len(policy.deployments) == 1 else "")
    dep = policy.deployments.get(named)
    if dep is not None and "ttft_slo_s" not in settings.model_fields_set:
        # The policy's own promise, unless the settings (or --ttft-slo) say otherwise.
        settings = settings.model_copy(update={"ttft_slo_s": dep.slo.ttft_s})
    setup = prepare(policy, trace, settings, deployment, catalog)
    notes = list(setup.notes)
    if "on-demand" in scenarios and not setup.offers:
        scenarios = tuple(name for name in scenarios if name != "on-demand")
        notes.append(
            f"no on-demand baseline: no allowed cloud sells {setup.dep.gpus}x {setup.dep.sku} "
            f"inside the lock of {setup.deployment} (spillover providers or credentials)"
        )
    if "managed-only" in scenarios and not setup.managed:
        scenarios = tuple(name for name in scenarios if name != "managed-only")
        notes.append(
            f"no managed-only scenario: {setup.deployment} has no managed endpoint inside its lock"
        )
    scored_is_tuning = tune_on is None
    tune = trace if tune_on is None else tune_on
    tuning = {
        "on": "the scored trace" if scored_is_tuning else (tune_label or tune.source),
        "tuned_on_scored_data": scored_is_tuning,
        "requests": len(tune),
        "duration_s": tune.duration_s,
    }
    if scored_is_tuning:
        notes.append(
            "the baselines' searches were tuned on the scored data itself (their best case; "
            "pass --tune-on TRACE or --tune-on hour:N to tune on other data)"
        )
    else:
        notes.append(f"the baselines' searches were tuned on {tuning['on']}, then scored here")
    searches: dict[str, Search] = {}
    results: dict[str, ScenarioResult] = {}
    if "reserved-for-peak" in scenarios:
        search = peak_reservation(setup, tune, settings)
        searches["reserved-for-peak"] = search
        notes.append(search.note)
        if scored_is_tuning and search.result is not None:
            results["reserved-for-peak"] = search.result
        else:
            results["reserved-for-peak"] = run_scenario(
                "reserved-for-peak", setup, trace, settings, reserved_machines=int(search.value)
            )
    od = settings.on_demand
    if "on-demand" in scenarios:
        if od.target_qps_per_replica is None and od.tune:
            search = on_demand_target(setup, tune, settings)
            searches["on-demand"] = search
            notes.append(search.note)
            setup = replace(setup, target_qps_per_replica=search.value)
            if scored_is_tuning and search.result is not None:
                results["on-demand"] = search.result
        else:
            how = "given" if od.target_qps_per_replica is not None else "a load test's"
            notes.append(
                f"on-demand target {setup.target_qps_per_replica:.3g} requests/s per replica "
                f"({how}, not searched)"
            )
    setup = replace(setup, notes=tuple(notes))
    for name in scenarios:
        if name not in results and name != "hindsight-bound":
            results[name] = run_scenario(name, setup, trace, settings)
    results = {name: results[name] for name in scenarios if name in results}
    summaries = {name: summarize(r, setup, settings) for name, r in results.items()}
    if "hindsight-bound" in scenarios:
        bound = hindsight_bound(setup, trace, settings)
        summaries["hindsight-bound"] = bound
        setup = replace(setup, notes=(*setup.notes, f"hindsight-bound: {bound['how']}"))
    hours = trace.duration_s / 3600
    return Simulation(
        setup=setup,
        settings=settings,
        trace=trace,
        results=results,
        summaries=summaries,
        comparison=report.comparison(
            summaries,
            hours=hours,
            reserved_usd_per_gpu_hour=setup.reserved_usd_per_gpu_hour,
            on_demand_usd_per_gpu_hour=setup.on_demand_usd_per_gpu_hour,
        ),
        wall_s=time.perf_counter() - started,
        searches=searches,
        tuning=tuning,
    )
