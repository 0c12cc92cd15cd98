"""Run the three scenarios on one trace and gather everything they show."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import simulator.report as report
from decisions.policy import Policy
from providers.catalog import Catalog
from simulator.figure import plot  # the PNG
from simulator.scenarios import (
    SCENARIOS,
    ScenarioResult,
    Setup,
    prepare,
    run_scenario,
    summarize,
    tune_on_demand,
)
from simulator.settings import SimSettings
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


def simulate(
    policy: Policy,
    trace: Trace,
    settings: SimSettings | None = None,
    *,
    deployment: str | None = None,
    catalog: Catalog | None = None,
    scenarios: tuple[str, ...] = SCENARIOS,
) -> Simulation:
    """Play ``trace`` through each scenario and compare them."""
    settings = settings or SimSettings()
    started = time.perf_counter()
    setup = prepare(policy, trace, settings, deployment, catalog)
    if "on-demand" in scenarios and not setup.offers:
        scenarios = tuple(name for name in scenarios if name != "on-demand")
        note = (
            f"no on-demand baseline: no allowed cloud sells {setup.dep.gpus}x {setup.dep.sku} "
            f"inside the lock of {setup.deployment} (spillover providers or credentials)"
        )
        setup = replace(setup, notes=(*setup.notes, note))
    od = settings.on_demand
    if "on-demand" in scenarios and od.target_qps_per_replica is None and od.tune:
        target, note = tune_on_demand(setup, trace, settings)
        setup = replace(setup, target_qps_per_replica=target, notes=(*setup.notes, note))
    results = {name: run_scenario(name, setup, trace, settings) for name in scenarios}
    summaries = {name: summarize(r, setup, settings) for name, r in results.items()}
    return Simulation(
        setup=setup,
        settings=settings,
        trace=trace,
        results=results,
        summaries=summaries,
        comparison=report.comparison(summaries),
        wall_s=time.perf_counter() - started,
    )
