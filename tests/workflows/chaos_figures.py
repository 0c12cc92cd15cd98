"""The figures of the active-active chaos run (``tests/workflows/active_active.py``): what was
set, what each kill did to the deployment's decisions and to the restarted scheduler's fleet
view, and what happened to the machines. Plain values; ``figures()`` is the JSON written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChaosSettings:
    rounds: int = 4
    seed: int = 17
    #: The schedulers' report interval; decisions are made once per interval too.
    interval_s: float = 0.5
    #: A scheduler runs this long (uniform) after it answered before the next kill.
    up_s: tuple[float, float] = (0.5, 2.5)
    #: A killed scheduler stays down this long (uniform).
    down_s: tuple[float, float] = (0.1, 1.5)
    max_spilled: int = 1
    #: Concurrent requests per healthy replica.
    load_per_replica: int = 8
    #: How long the spill back (drain, terminate, sweep) may take after the load stops.
    release_within_s: float = 60.0


@dataclass
class Kill:
    round: int
    victim: str
    survivor: str
    killed_at: float
    restarted_at: float = 0.0
    #: When the restarted scheduler first answered GetFleet.
    answered_at: float = 0.0
    #: When its fleet view first equalled the survivor's (0: never within the limit).
    converged_at: float = 0.0
    #: Filled from the workflow history.
    last_decision_before: float = 0.0
    first_decision_after: float = 0.0
    first_decision_by: str = ""
    #: What Temporal timed out, in order, before the first decision after the kill (empty:
    #: nothing; the survivor's worker took the next task at once).
    waited_for: list[str] = field(default_factory=list)
    #: The kill came while the decisions were still paused by an earlier one (its gap is that
    #: kill's, not its own).
    in_earlier_pause: bool = False

    @property
    def gap_s(self) -> float:
        return self.first_decision_after - self.last_decision_before

    @property
    def resume_s(self) -> float:
        return self.first_decision_after - self.killed_at

    @property
    def converge_s(self) -> float:
        return self.converged_at - self.answered_at if self.converged_at else float("inf")


@dataclass
class ChaosReport:
    settings: ChaosSettings
    kills: list[Kill] = field(default_factory=list)
    decisions: int = 0
    #: Plan decisions per scheduler name ("a", "b").
    decisions_by: dict[str, int] = field(default_factory=dict)
    machines_launched: int = 0
    max_live_machines: int = 0
    #: Provision and release workflows the deployment started.
    provisions: int = 0
    releases: int = 0
    duplicate_keys: list[str] = field(default_factory=list)
    #: Samples (four a second) with more machines live than ``max_spilled``: a machine still
    #: being given back while the next one is launched counts here, so it is shown, not judged.
    over_cap: int = 0
    leaked: list[str] = field(default_factory=list)
    rented_served: bool = False
    #: How long a killed worker's cached workflow's task waited for it (the sticky timeout
    #: as Temporal applied it), and how long the survivor then took to finish that task (a
    #: replay of the run's history and the task itself).
    sticky_waits_s: list[float] = field(default_factory=list)
    takeover_s: list[float] = field(default_factory=list)
    #: Decisions a scheduler made while still learning the fleet after its start (held).
    warm_up_holds: int = 0
    #: The usual time between two decisions (the median gap without a kill in it).
    cadence_s: float = 0.0
    elapsed_s: float = 0.0
    release_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        own = [k for k in self.kills if not k.in_earlier_pause]
        gaps = [k.gap_s for k in own]
        extra = [k.gap_s - self.cadence_s for k in own]
        quick = [k for k in own if not any("held" in w for w in k.waited_for)]
        converge = [k.converge_s for k in self.kills]
        return {
            "rounds": len(self.kills),
            "seed": self.settings.seed,
            "interval_s": self.settings.interval_s,
            "decisions": self.decisions,
            "decisions_by": self.decisions_by,
            "warm_up_holds": self.warm_up_holds,
            "machines_launched": self.machines_launched,
            "max_live_machines": self.max_live_machines,
            "provisions": self.provisions,
            "releases": self.releases,
            "duplicate_machines": len(self.duplicate_keys),
            "samples_over_max_spilled": self.over_cap,
            "leaked_machines": len(self.leaked),
            "rented_replica_served": self.rented_served,
            "decision_cadence_s": round(self.cadence_s, 3),
            "decision_gap_s": _spread(gaps),
            "decision_delay_s": _spread(extra),
            "kills_in_an_earlier_pause": len(self.kills) - len(own),
            "kills_that_caught_a_started_task": len(own) - len(quick),
            "decision_delay_other_kills_s": _spread([k.gap_s - self.cadence_s for k in quick]),
            "resume_after_kill_s": _spread([k.resume_s for k in self.kills]),
            "converge_s": _spread(converge),
            "sticky_wait_s": _spread(self.sticky_waits_s),
            "takeover_task_s": _spread(self.takeover_s),
            "release_s": round(self.release_s, 2),
            "elapsed_s": round(self.elapsed_s, 1),
            "kills": [
                {
                    "round": k.round,
                    "victim": k.victim,
                    "down_s": round(k.restarted_at - k.killed_at, 3),
                    "decision_gap_s": round(k.gap_s, 3),
                    "decision_delay_s": round(k.gap_s - self.cadence_s, 3),
                    "resume_s": round(k.resume_s, 3),
                    "first_decision_by": k.first_decision_by,
                    "waited_for": k.waited_for,
                    "in_earlier_pause": k.in_earlier_pause,
                    "converge_s": round(k.converge_s, 3),
                }
                for k in self.kills
            ],
            "errors": self.errors,
        }


def _spread(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "min": round(ordered[0], 3),
        "median": round(ordered[len(ordered) // 2], 3),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "max": round(ordered[-1], 3),
    }
