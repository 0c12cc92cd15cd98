"""Two schedulers, active-active, one of them killed at random moments of a spill, many rounds.

The set-up and the measurements are ``tests/workflows/active_active.py``'s (the test in
``tests/workflows/test_active_active.py`` runs a few rounds of the same): two ``spillway
scheduler run`` processes on one Temporal task queue (a dev server started here), EC2 and S3 on
a moto server, machines stood in for by local agent processes, every agent reporting to both.
Each round kills a seeded random scheduler with SIGKILL at a seeded random moment and starts it
again. Reported: duplicate and leaked machines, the pause in the deployment's decisions around
each kill (from the workflow's history, beside the usual time between decisions), what Temporal
timed out before the survivor's worker took over, and how long after the restarted scheduler
first answered its fleet view equalled the survivor's.

Targets: zero duplicate and zero leaked machines; decisions resume within one report interval
of when they were due; a restarted scheduler's fleet view converges within two intervals.

Prints a table and writes ``bench/results/active_active.json``.

    .venv/bin/python bench/active_active.py --rounds 30 --interval 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "active_active.json"


def _spread_text(spread: dict[str, float]) -> str:
    """median / p90 / max."""
    if not spread:
        return "-"
    return f"{spread['median']:.2f} / {spread['p90']:.2f} / {spread['max']:.2f}s"


def table(figures: dict[str, Any]) -> str:
    from rich.console import Console
    from rich.table import Table

    interval = figures["interval_s"]
    rows = Table(
        title=f"{figures['rounds']} kills, report interval {interval:g}s", title_justify="left"
    )
    for column in (
        "ROUND",
        "KILLED",
        "DOWN S",
        "GAP S",
        "DELAY S",
        "WAITED FOR",
        "BY",
        "CONVERGE S",
    ):
        rows.add_column(
            column, justify="left" if column in ("KILLED", "WAITED FOR", "BY") else "right"
        )
    for k in figures["kills"]:
        rows.add_row(
            str(k["round"]),
            k["victim"],
            f"{k['down_s']:.2f}",
            f"{k['decision_gap_s']:.2f}",
            f"{k['decision_delay_s']:.2f}" + (" (earlier)" if k["in_earlier_pause"] else ""),
            ", ".join(k["waited_for"]) or "-",
            k["first_decision_by"],
            f"{k['converge_s']:.2f}",
        )
    summary = Table(title="Summary", title_justify="left")
    summary.add_column("FIGURE")
    summary.add_column("VALUE", justify="right")
    summary.add_column("TARGET")
    delay = figures["decision_delay_s"]
    converge = figures["converge_s"]
    for name, value, target in (
        ("duplicate machines", figures["duplicate_machines"], "0"),
        (
            "provisions / releases started",
            f"{figures['provisions']} / {figures['releases']}",
            "",
        ),
        (
            "samples with more machines live than max_spilled",
            figures["samples_over_max_spilled"],
            "",
        ),
        ("leaked machines", figures["leaked_machines"], "0"),
        ("machines launched", figures["machines_launched"], ""),
        ("decisions (by scheduler)", f"{figures['decisions']} {figures['decisions_by']}", ""),
        ("held while a restarted scheduler learnt the fleet", figures["warm_up_holds"], ""),
        ("usual time between decisions", f"{figures['decision_cadence_s']:.2f}s", ""),
        (
            "decision delay after a kill: median / p90 / max",
            f"{delay['median']:.2f} / {delay['p90']:.2f} / {delay['max']:.2f}s",
            f"<= {interval:g}s",
        ),
        (
            "  the same, kills that caught no started workflow task",
            _spread_text(figures["decision_delay_other_kills_s"]),
            f"<= {interval:g}s",
        ),
        (
            "kills that caught a started workflow task / came in an earlier pause",
            f"{figures['kills_that_caught_a_started_task']} / "
            f"{figures['kills_in_an_earlier_pause']}",
            "",
        ),
        (
            "  of which: wait for the killed worker / the survivor's takeover task",
            f"{_spread_text(figures['sticky_wait_s'])} / "
            f"{_spread_text(figures['takeover_task_s'])}",
            "",
        ),
        (
            "fleet view converged: median / p90 / max",
            f"{converge['median']:.2f} / {converge['p90']:.2f} / {converge['max']:.2f}s",
            f"<= {2 * interval:g}s",
        ),
        ("spill back took", f"{figures['release_s']:.1f}s", ""),
        ("run took", f"{figures['elapsed_s']:.0f}s", ""),
    ):
        summary.add_row(name, str(value), target)
    console = Console(width=160, record=True)
    console.print(rows)
    console.print(summary)
    return console.export_text()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from spillway.demo_setup import AWS_ENV, start_services
    from tests.workflows.active_active import run_chaos
    from tests.workflows.chaos_figures import ChaosSettings

    os.environ.update(AWS_ENV)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log
    with tempfile.TemporaryDirectory(prefix="spillway-aa-") as tmp:
        root = Path(tmp)
        services = start_services(root)
        try:
            settings = ChaosSettings(
                rounds=args.rounds,
                seed=args.seed,
                interval_s=args.interval,
                max_spilled=args.max_spilled,
                release_within_s=120,
            )
            report = await run_chaos(root, services.temporal_address, services.moto_url, settings)
        finally:
            services.stop()
    return report.figures()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=30, help="kills (default 30)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the kills (default 7)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="report interval, s (default 1.0)"
    )
    parser.add_argument("--max-spilled", type=int, default=1, help="rented machines at most")
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    print(table(figures))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
