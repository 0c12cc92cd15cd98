"""``spillway plan``: what placement and autoscaling would do now, against a fleet snapshot.

Pure: turns a policy and a snapshot into lines of text. The CLI fetches the fleet and converts
the protobuf; this module does no I/O. Each deployment's current signal is treated as if it had
held for the whole window, so the plan shows what a sustained load would cause.
"""

from __future__ import annotations

from decisions.autoscale import Sample, decide, signal
from decisions.fleetview import FleetSnapshot
from decisions.placement import SkipZone, place
from decisions.policy import Policy
from providers.catalog import Catalog


def plan_lines(
    policy: Policy,
    snapshot: FleetSnapshot,
    catalog: Catalog,
    now: float,
    skip_zone: SkipZone | None = None,
) -> list[str]:
    changes: dict[str, int] = {}
    lines: list[str] = []
    for name, dep in policy.deployments.items():
        current = sum(1 for r in snapshot.replicas if r.deployment == name and not r.leaving)
        value = signal(name, dep, snapshot)
        span = max(dep.spillover.scale_up_window_s, dep.spillover.cool_down_s)
        samples = [] if value is None else [Sample(now - span, value), Sample(now, value)]
        decision = decide(name, dep, current, samples, now)
        changes[name] = decision.change
        shown = "no load reported" if value is None else f"{value:.2f}"
        lines.append(
            f"{name}: {current} replicas, {dep.autoscaling.signal} {shown} "
            f"(target {dep.autoscaling.target:g}) -> {decision.desired}: {decision.reason}"
        )
    for result in place(policy, snapshot, changes, catalog, skip_zone=skip_zone):
        lines.append(f"{result.deployment}: {result.reason}")
        for p in result.placements:
            lines.append(f"  + {p.where}: {p.reason}")
        for r in result.releases:
            lines.append(f"  - release {r.replica_id} on {r.agent_id}: {r.reason}")
        for note in result.notes:
            lines.append(f"  note: {note}")
        if result.lock_error:
            lines.append(f"  ERROR: {result.lock_error}")
    return lines
