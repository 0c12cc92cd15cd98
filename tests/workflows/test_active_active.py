"""Two schedulers, active-active: kill either one at random moments of a spill.

See ``tests/workflows/active_active.py`` for the set-up and what is measured; this runs a few
seeded rounds (``bench/active_active.py`` runs many and writes the figures to JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.workflows.active_active import run_chaos
from tests.workflows.chaos_figures import ChaosSettings


async def test_either_scheduler_dies_at_random_and_nothing_is_lost_or_doubled(
    tmp_path: Path, temporal_address: str, moto_server: str, aws_credentials: None
) -> None:
    settings = ChaosSettings(rounds=4, seed=20261201, interval_s=1.0, max_spilled=1)
    report = await run_chaos(tmp_path, temporal_address, moto_server, settings)
    figures = report.figures()
    print(json.dumps(figures, indent=1))
    assert report.errors == [], (figures, _logs(tmp_path))
    # Both schedulers died at least once (the seed sees to it).
    assert {k.victim for k in report.kills} == {"a", "b"}
    # The spill happened: a rented machine served, and every one was given back.
    assert report.rented_served and report.machines_launched >= 1, figures
    # One machine per provision, never two for one launch key or one provision.
    assert report.duplicate_keys == [], figures
    assert report.machines_launched <= report.provisions, figures
    assert report.leaked == [], figures
    interval = settings.interval_s
    for kill in report.kills:
        delay = kill.gap_s - report.cadence_s
        if kill.in_earlier_pause:
            pass  # its gap is the earlier kill's, judged there
        elif not kill.waited_for:
            # Decisions resume within one report interval of when they were due (the usual
            # cadence is one interval plus the time a decision takes).
            assert delay <= interval, (kill, figures)
        else:
            # The dead worker had the workflow cached: its next task waited half an interval
            # for it, then the survivor replayed the history. A task the dead worker had
            # started waits for its timeout (the workflow task's 10 s, the plan activity's
            # 30 s), once per kill that caught one before the decisions resumed.
            bound = sum(
                30 if "activity" in w else 10 if "held" in w else interval for w in kill.waited_for
            )
            assert delay <= bound + interval, (kill, figures)
        # The restarted scheduler's fleet view is the survivor's within two intervals.
        assert kill.converge_s <= 2 * interval, (kill, figures)


def _logs(root: Path) -> str:
    return "".join(p.read_text()[-3000:] for p in sorted(root.glob("scheduler-*.log")))
