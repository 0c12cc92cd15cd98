"""The values a planning step takes and returns: plain dataclasses, one in and one out.

:func:`decisions.planning.plan_step` reads a :class:`PlanInput` (the state a deployment
workflow keeps between ticks: load samples, pending provisions, replicas being released) and
returns a :class:`PlanOutput` (what to start, what to release, and why). The deployment
workflow carries these through Temporal, and the simulator builds them itself, so they are
plain fields only (str, numbers, lists, nested dataclasses): Temporal's JSON converter carries
them and fields can be added later with defaults.

Nothing here may do I/O or import anything but the standard library: the workflow sandbox
imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OfferChoice:
    """One cloud offer a provision may launch: an instance type in a region at a price."""

    cloud: str
    instance_type: str
    region: str
    zones: list[str] = field(default_factory=list)
    usd_per_hour: float = 0.0

    def describe(self) -> str:
        return f"{self.cloud} {self.instance_type} in {self.region} (${self.usd_per_hour:.2f}/h)"


@dataclass
class ReplicaTemplate:
    """What every replica of a deployment runs, taken from the policy when it is planned."""

    deployment: str
    model: str
    weights: str
    runtime: str
    runtime_args: list[str] = field(default_factory=list)
    sku: str = ""
    gpus: int = 1


@dataclass
class Timeouts:
    register_s: float = 900.0
    prefetch_s: float = 3600.0
    start_s: float = 1800.0
    drain_s: float = 600.0
    heartbeat_s: float = 30.0


@dataclass
class SamplePoint:
    at: float
    value: float


def trim_samples(samples: list[SamplePoint], horizon: float) -> list[SamplePoint]:
    """The samples at or after ``horizon``, and the newest one before it.

    That one shows the signal already held when the window began; without it no window
    could ever be covered from start to end.
    """
    before = [x for x in samples if x.at < horizon]
    kept = [x for x in samples if x.at >= horizon]
    return before[-1:] + kept


@dataclass
class PendingReplica:
    """A replica a workflow is bringing up; counted as capacity before it reports."""

    replica_id: str
    workflow_id: str
    where: str  # "reserved" or "cloud"
    agent_id: str = ""
    gpu_indices: list[int] = field(default_factory=list)
    usd_per_hour: float = 0.0
    #: When the provision started (workflow time, seconds since the epoch).
    since: float = 0.0


@dataclass
class PlanInput:
    deployment: str
    samples: list[SamplePoint] = field(default_factory=list)
    last_change_at: float | None = None
    pending: list[PendingReplica] = field(default_factory=list)
    #: Replica ids being released: no longer counted as capacity.
    releasing: list[str] = field(default_factory=list)
    #: No new provisions before this time (after a failure); releases still happen.
    hold_until: float = 0.0


@dataclass
class PlannedStart:
    replica_id: str
    where: str  # "reserved" or "cloud"
    reason: str
    agent_id: str = ""
    gpu_indices: list[int] = field(default_factory=list)
    #: Cloud placements: the chosen offer first, then the ones to fail over to, in order.
    offers: list[OfferChoice] = field(default_factory=list)


@dataclass
class PlannedRelease:
    replica_id: str
    agent_id: str
    reason: str
    cloud: str = ""
    #: The machine's idempotency key; empty for a replica on a machine Spillway did not rent.
    key: str = ""
    usd_per_hour: float = 0.0


@dataclass
class PlanOutput:
    #: False once the deployment is no longer in the policy: its workflow ends.
    exists: bool
    now: float
    policy_digest: str = ""
    sample: SamplePoint | None = None
    current: int = 0
    desired: int = 0
    #: Why, for people: the autoscaling decision and the placement.
    reason: str = ""
    starts: list[PlannedStart] = field(default_factory=list)
    releases: list[PlannedRelease] = field(default_factory=list)
    #: Set when no offer inside the residency lock can ever take a replica.
    lock_error: str = ""
    notes: list[str] = field(default_factory=list)
    template: ReplicaTemplate | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    decide_every_s: float = 5.0
    failure_backoff_s: float = 60.0
    #: How long samples are kept: the longest window of the deployment.
    window_s: float = 600.0
    weights_dir: str = ""
    weights_endpoint_url: str = ""
