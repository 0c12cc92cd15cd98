"""Placement decision time: 200 deployments over 1,000 agents and the whole catalog.

Builds a policy of ``--deployments`` deployments (SKUs and residency locks mixed, spillover on)
and a fleet snapshot of ``--agents`` connected agents in 20 reserved pools, then times
:func:`decisions.placement.place` asking every deployment for 3 more replicas. Prints a table
(median, p90, max over ``--rounds``) and writes JSON under ``bench/results/``. Target: < 50 ms.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from decisions.fleetview import AgentView, FleetSnapshot
from decisions.placement import place
from decisions.policy import Policy
from providers.catalog import default_catalog

SKUS = [("H100-80GB", 8), ("H100-80GB", 1), ("L40S", 1), ("A100-80GB", 8), ("H200", 8)]
GROUPS = ["eu", "us", None, "apac"]


def build(deployments: int, agents: int) -> tuple[Policy, FleetSnapshot]:
    deps = {}
    for i in range(deployments):
        sku, gpus = SKUS[i % len(SKUS)]
        deps[f"d{i}"] = {
            "model": "m",
            "weights": "s3://b/m",
            "sku": sku,
            "gpus": gpus,
            "pools": [f"pool-{i % 20}"],
            "max_replicas": 50,
            "autoscaling": {"target": 4},
            "spillover": {
                "enabled": True,
                "residency": GROUPS[i % len(GROUPS)],
                "max_spilled_replicas": 10,
            },
        }
    policy = Policy.model_validate(
        {
            "credentials": {c: {"profile": "p"} for c in ("aws", "gcp", "azure")},
            "deployments": deps,
        }
    )
    views = tuple(
        AgentView(f"a{i}", f"pool-{i % 20}", "onprem", "dc", "eu", True, 8, tuple(range(i % 9, 8)))
        for i in range(agents)
    )
    return policy, FleetSnapshot(views, ())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deployments", type=int, default=200)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    catalog = default_catalog()
    policy, snapshot = build(args.deployments, args.agents)
    changes = {name: 3 for name in policy.deployments}
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        results = place(policy, snapshot, changes, catalog)
        times.append((time.perf_counter() - start) * 1e3)
    placed = sum(len(r.placements) for r in results)
    times.sort()
    row = {
        "deployments": args.deployments,
        "agents": args.agents,
        "placements": placed,
        "median_ms": round(statistics.median(times), 2),
        "p90_ms": round(times[int(len(times) * 0.9) - 1], 2),
        "max_ms": round(times[-1], 2),
        "target_ms": 50,
        "machine": platform.platform(),
    }
    header = ("deployments", "agents", "placed", "median ms", "p90 ms", "max ms")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (11, 6, 6, 9, 7, 7), strict=True)))
    print(
        f"{args.deployments:>11} {args.agents:>6} {placed:>6} {row['median_ms']:>9} "
        f"{row['p90_ms']:>7} {row['max_ms']:>7}"
    )
    print("target < 50 ms:", "met" if row["median_ms"] < 50 else "NOT met")
    out = args.out or Path(__file__).parent / "results" / "placement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
