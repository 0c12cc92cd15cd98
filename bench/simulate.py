"""``spillway simulate`` speed and memory, and what the hybrid policy saves, on a real trace.

Runs the command as a user would (a fresh process; table, JSON, PNG and per-request CSV) on the
Azure conversation trace: one hour as recorded, and stretched to 24 hours by looping it. Each
run simulates the three scenarios (reserved-only, on-demand-only, the policy). In the same
run, the one-hour case is played again with the replica model stepping every decode iteration
(``fast_forward: false``) as the peer: the straightforward discrete-event simulation, which
must give the same numbers, only slower.

The on-demand baseline scales like SkyServe with a target of requests per second per replica,
which ``spillway simulate`` tunes to the cheapest setting that keeps 99% of requests within the
TTFT target over the trace's first hour: the baseline at its best.

The policy: one Llama-3.1-8B-class deployment on single L40S replicas, locked to the ``us``
residency group, spilling to AWS, GCP and Azure; reserved GPUs sized to the trace's mean load.
Prints a table and writes JSON under ``bench/results/``. Targets: one hour in under 30 s, 24
hours in under 5 minutes, peak memory under 1 GB; the policy the cheapest of the three that
keeps 99% of requests within the TTFT target.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from simulator.report import verdict

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"

POLICY: dict[str, Any] = {
    "credentials": {
        "aws": {"profile": "spillway"},
        "gcp": {"file": "/etc/spillway/gcp.json"},
        "azure": {"env": ["AZURE_CLIENT_ID"]},
    },
    "deployments": {
        "chat": {
            "model": "llama-3.1-8b",
            "weights": "s3://models/llama-3.1-8b-instruct/",
            "sku": "L40S",
            "gpus": 1,
            "pools": ["reserved-us"],
            "min_replicas": 1,
            "max_replicas": 10,
            "autoscaling": {"signal": "running_per_replica", "target": 24},
            "spillover": {
                "enabled": True,
                "providers": ["aws", "gcp", "azure"],
                "residency": "us",
                "max_spilled_replicas": 6,
                "scale_up_window_s": 30,
                "cool_down_s": 300,
            },
        }
    },
}


def run_case(
    name: str, trace: Path, work: Path, loops: int, settings: dict[str, Any]
) -> dict[str, Any]:
    out = work / name
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    settings_file = work / f"{name}-settings.yaml"
    settings_file.write_text(yaml.safe_dump(settings))
    command = [
        str(Path(sys.executable).parent / "spillway"),
        "simulate",
        "--trace",
        str(trace),
        "--policy",
        str(policy),
        "--settings",
        str(settings_file),
        "--loops",
        str(loops),
        "--out",
        str(out),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # Peak memory of this child alone: each case runs in its own wrapper process.
    wrapper = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys; "
        "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)",
        *command,
    ]
    done = subprocess.run(wrapper, capture_output=True, text=True, check=False, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{name}: spillway simulate failed:\n{done.stderr}")
    data = json.loads((out / "simulation.json").read_text())
    return {
        "case": name,
        "loops": loops,
        "requests": data["trace"]["requests"],
        "simulated_hours": data["trace"]["duration_s"] / 3600,
        "wall_s": wall,
        "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "peak_rss_mb": int(done.stdout.strip().splitlines()[-1]) / 1024,
        "scenarios": data["scenarios"],
        "comparison": data["comparison"],
        "reserved": data["reserved"],
        "on_demand_target_qps_per_replica": data["on_demand_target_qps_per_replica"],
        "notes": data["notes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--hours", type=int, default=24, help="the stretched case's length")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "simulate.json")
    args = parser.parse_args()
    if not args.trace.is_file():
        raise SystemExit(f"no trace at {args.trace}; pass --trace")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = [
            run_case("1h", args.trace, work, 1, {}),
            run_case("1h-step-by-step", args.trace, work, 1, {"fast_forward": False}),
            run_case(f"{args.hours}h", args.trace, work, args.hours, {}),
        ]
    targets = {"1h": 30.0, f"{args.hours}h": 300.0}
    console = Console(width=150)
    speed = Table(title="spillway simulate: three scenarios per run, a fresh process each")
    for column in ("case", "requests", "sim. hours", "wall s", "CPU s", "peak RSS MB", "target"):
        speed.add_column(column, justify="left" if column == "case" else "right")
    for case in cases:
        target = targets.get(case["case"])
        met = target is not None and case["wall_s"] < target and case["peak_rss_mb"] < 1024
        speed.add_row(
            case["case"],
            f"{case['requests']:,}",
            f"{case['simulated_hours']:.1f}",
            f"{case['wall_s']:.1f}",
            f"{case['cpu_s']:.1f}",
            f"{case['peak_rss_mb']:.0f}",
            "-" if target is None else f"< {target:.0f}s, < 1 GB: {'met' if met else 'NOT met'}",
        )
    console.print(speed)
    fast, slow = cases[0], cases[1]
    same = json.dumps(_strip(fast["scenarios"]), sort_keys=True) == json.dumps(
        _strip(slow["scenarios"]), sort_keys=True
    )
    console.print(
        f"fast-forward vs step-by-step (1 h): {slow['wall_s'] / fast['wall_s']:.2f}x faster, "
        f"results {'identical' if same else 'DIFFERENT'}"
    )
    for case in (cases[0], cases[2]):
        result = Table(title=f"{case['case']}: {case['reserved']['machines']} reserved L40S")
        for column in ("scenario", "TTFT p99 s", "within target", "total $", "x policy"):
            result.add_column(column, justify="left" if column == "scenario" else "right")
        ratios = case["comparison"]["cost_vs_policy"]
        for name, s in case["scenarios"].items():
            result.add_row(
                name,
                f"{s['ttft_s']['p99']:.2f}",
                f"{s['slo_attainment'] * 100:.2f}%",
                f"{s['cost_usd']['total']:,.2f}",
                f"{ratios[name]:.2f}",
            )
        console.print(result)
        console.print(verdict(case["comparison"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {"python": platform.python_version(), "cpus": _cpus()},
                "fast_forward_identical": same,
                "cases": cases,
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"wrote {args.out}")


def _strip(scenarios: dict[str, Any]) -> dict[str, Any]:
    return {n: {k: v for k, v in s.items() if k != "wall_s"} for n, s in scenarios.items()}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
