"""The baselines at their best: searches that play a scenario until it holds the SLO.

- :func:`peak_reservation`: the fewest reserved machines with which ``reserved-for-peak``
  (reserved GPUs only, no spilling) keeps :data:`~simulator.scenarios.SLO_SHARE` of requests
  within the TTFT target: doubling from the configured reservation until one holds, then
  bisection between the last that missed and the first that held.
- :func:`on_demand_target`: the highest target requests/s per replica with which the
  ``on-demand`` baseline holds it, over a log-spaced scale of targets from
  ``on_demand.target_range`` times what one replica holds in a load test: the top of the scale
  first, then the bottom, then bisection between them. A higher target rents fewer replicas,
  so the highest that holds is the cheapest such service. When even the bottom misses, no
  target holds; the bottom's run (the most replicas) is kept and the note says so.

Both assume that holding is monotone in what they search (more machines, a lower target: no
worse), as bisection must. Every candidate's run stops as soon as more requests have missed
than the SLO allows (so a candidate that misses costs a fraction of a run), and every run is
kept: the search's answer comes with its full run on the tuning data, which is the scenario's
result when the tuning data is the scored data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from simulator.cluster import TooManyMisses
from simulator.scenarios import SLO_SHARE, ScenarioResult, Setup, miss_budget, run_scenario
from simulator.settings import SimSettings
from simulator.summary import slo_attainment
from simulator.trace import Trace

#: The largest reservation the peak search tries, in machines.
MAX_MACHINES = 256


@dataclass
class Search:
    """What a search found: the value, whether it holds, and every candidate it played."""

    scenario: str
    value: float
    holds: bool
    note: str
    #: (candidate, held, attainment: None when its run stopped early), in the order played.
    tried: list[tuple[float, bool, float | None]] = field(default_factory=list)
    #: The full run at ``value`` on the tuning data.
    result: ScenarioResult | None = None

    def data(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "value": self.value,
            "holds": self.holds,
            "note": self.note,
            "runs": len(self.tried),
            "tried": [{"candidate": c, "holds": h, "slo_attainment": a} for c, h, a in self.tried],
        }


class _Player:
    """Plays candidates of one scenario on the tuning trace, once each."""

    def __init__(self, name: str, setup: Setup, trace: Trace, settings: SimSettings) -> None:
        self.name = name
        self.setup = setup
        self.trace = trace
        self.settings = settings
        self.budget = miss_budget(trace)
        self.tried: list[tuple[float, bool, float | None]] = []
        self.runs: dict[float, ScenarioResult] = {}
        self.known: dict[float, bool] = {}

    def holds(self, candidate: float, full: bool = False) -> bool:
        if candidate in self.known and (not full or candidate in self.runs):
            return self.known[candidate]
        kwargs: dict[str, Any] = (
            {"reserved_machines": int(candidate)}
            if self.name == "reserved-for-peak"
            else {"target_qps": candidate}
        )
        try:
            result = run_scenario(
                self.name,
                self.setup,
                self.trace,
                self.settings,
                stop_after_misses=None if full else self.budget,
                **kwargs,
            )
        except TooManyMisses:
            self.known[candidate] = False
            self.tried.append((candidate, False, None))
            return False
        attainment = slo_attainment(result.cluster, self.settings.ttft_slo_s)
        held = attainment >= SLO_SHARE - 1e-12
        self.known[candidate] = held
        self.runs[candidate] = result
        self.tried.append((candidate, held, attainment))
        return held


def peak_reservation(setup: Setup, trace: Trace, settings: SimSettings) -> Search:
    """The smallest static reservation (machines) holding the SLO on ``trace`` alone."""
    play = _Player("reserved-for-peak", setup, trace, settings)
    high = max(1, setup.reserved_machines)
    low = 0  # no machine serves nothing
    while not play.holds(high):
        low = high
        if high >= MAX_MACHINES:
            play.holds(high, full=True)
            return Search(
                "reserved-for-peak",
                high,
                False,
                f"no reservation up to {MAX_MACHINES} machines holds {SLO_SHARE:.0%} within "
                "the TTFT target without spilling; shown with the largest",
                play.tried,
                play.runs[high],
            )
        high = min(MAX_MACHINES, high * 2)
    while high - low > 1:
        middle = (low + high) // 2
        if middle >= 1 and play.holds(middle):
            high = middle
        else:
            low = middle
    note = (
        f"reserved-for-peak: {high} machines ({high * setup.gpus_per_machine} GPUs), the "
        f"fewest that keep {SLO_SHARE:.0%} within the TTFT target without spilling "
        f"({len(play.tried)} runs)"
    )
    return Search("reserved-for-peak", high, True, note, play.tried, play.runs[high])


def target_scale(setup: Setup, settings: SimSettings) -> list[float]:
    """The targets the on-demand search may pick, lowest first."""
    od = settings.on_demand
    low, high = od.target_range
    points = od.search_points
    base = setup.replica_capacity_rps
    ratio = math.log(high / low)
    return [base * low * math.exp(ratio * i / (points - 1)) for i in range(points)]


def on_demand_target(setup: Setup, trace: Trace, settings: SimSettings) -> Search:
    """The highest target requests/s per replica with which on-demand holds the SLO."""
    play = _Player("on-demand", setup, trace, settings)
    scale = target_scale(setup, settings)
    top, bottom = len(scale) - 1, 0
    share = f"{SLO_SHARE:.0%}"
    if play.holds(scale[top]):
        value = scale[top]
        note = (
            f"on-demand target {value:.3g} requests/s per replica holds {share} within the "
            "TTFT target: the top of the searched scale (widen on_demand.target_range)"
        )
        return Search("on-demand", value, True, note, play.tried, play.runs[value])
    if not play.holds(scale[bottom], full=True):
        value = scale[bottom]
        attainment = slo_attainment(play.runs[value].cluster, settings.ttft_slo_s)
        note = (
            f"on-demand: no target from {scale[bottom]:.3g} to {scale[top]:.3g} requests/s "
            f"per replica holds {share} within the TTFT target; the lowest (the most "
            f"replicas) reaches {attainment:.2%} and is shown"
        )
        return Search("on-demand", value, False, note, play.tried, play.runs[value])
    good, bad = bottom, top
    while bad - good > 1:
        middle = (good + bad) // 2
        if play.holds(scale[middle]):
            good = middle
        else:
            bad = middle
    value = scale[good]
    note = (
        f"on-demand target {value:.3g} requests/s per replica: the highest of "
        f"{len(scale)} from {scale[bottom]:.3g} to {scale[top]:.3g} that keeps {share} within "
        f"the TTFT target ({scale[bad]:.3g} misses; {len(play.tried)} runs)"
    )
    return Search("on-demand", value, True, note, play.tried, play.runs[value])
