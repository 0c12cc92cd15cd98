"""``spillway simulate``: replay a request trace through Spillway's own decisions.

The trace's requests meet simulated replicas (the continuous-batching model the simulated
runtime serves with), simulated clouds (boot time, capacity errors, list prices, billing) and
the scheduler's real planning (:func:`workflows.planning.plan_step`, which runs the pure
autoscaling and placement functions). The same trace is played three times, for the policy as
written and two baselines, and :func:`simulate` returns what each cost and how it held the
time-to-first-token target.

This package imports two pure modules from outside ``scheduler``: the replica model
(``agent.runtimes.simulated_model``), so that simulation and the simulated runtime cannot
drift apart, and ``workflows.planning``, so that the decisions are the workflow's own. Neither
does I/O or imports Temporal.
"""

from __future__ import annotations

from scheduler.simulate.run import Simulation, simulate
from scheduler.simulate.settings import SimSettings, load_settings
from scheduler.simulate.trace import Trace, TraceError, load_trace

__all__ = [
    "SimSettings",
    "Simulation",
    "Trace",
    "TraceError",
    "load_settings",
    "load_trace",
    "simulate",
]
