"""``spillway simulate``: replay a request trace through Spillway's own decisions.

The trace's requests meet simulated replicas (the continuous-batching model the simulated
runtime serves with), simulated clouds (boot time, capacity errors, list prices, billing) and
Spillway's own planning (:func:`decisions.planning.plan_step`, which runs the pure autoscaling
and placement functions), through a simulated gateway that routes every request with the
gateway's own :func:`decisions.routing.route`. The same trace is played for the policy as
written and for baselines at their searched best (:mod:`simulator.scenarios`), the hindsight
bound is computed beside them, and :func:`simulate` returns what each cost and how it held
the time-to-first-token target.

Besides :mod:`decisions` (so that the decisions are the workflow's own) and the provider
catalog, this package imports one module of the agent: the replica model
(``agent.runtimes.simulated_model``), so that simulation and the simulated runtime cannot
drift apart. It never imports the scheduler, the workflows, Temporal or a cloud SDK.
"""

from __future__ import annotations

from simulator.run import Simulation, simulate
from simulator.settings import SimSettings, load_settings
from simulator.trace import Trace, TraceError, load_trace

__all__ = [
    "SimSettings",
    "Simulation",
    "Trace",
    "TraceError",
    "load_settings",
    "load_trace",
    "simulate",
]
