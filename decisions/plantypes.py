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
class CheaperSince:
    """A rented replica found cheaper to release than to keep, and since when (it is released
    once that held for ``autoscaling.costs.release_after_s``)."""

    replica_id: str
    since: float


@dataclass
class PlanInput:
    """What a caller of ``plan_step`` keeps between steps of one deployment.

    Every field but ``deployment`` has a default, so a caller that keeps less still plans;
    what it does not keep is simply not known. A caller copies the fields marked *carried*
    from the previous :class:`PlanOutput` (same name) into the next input. Times are seconds
    since the epoch on the caller's clock (workflow time, simulated time), durations seconds.

    The fast signal and the cost model read the fleet snapshot, not this: per deployment a
    ``GatewayLoad`` (``queue_depth``, ``oldest_queued_s``, ``overflow_tokens_per_s`` counting
    input and output tokens, ``in_flight`` by replica id and by managed endpoint name,
    ``gateways`` > 0 so that in-flight counts are trusted), and per replica
    ``generation_tokens_per_s`` (output tokens per second; 0 when unknown).
    """

    deployment: str
    #: The signal's samples: the previous outputs' ``sample``, trimmed to ``window_s``.
    samples: list[SamplePoint] = field(default_factory=list)
    #: When replicas were last started or released.
    last_change_at: float | None = None
    pending: list[PendingReplica] = field(default_factory=list)
    #: Replica ids being released: no longer counted as capacity.
    releasing: list[str] = field(default_factory=list)
    #: No new provisions before this time (after a failure); releases still happen.
    hold_until: float = 0.0
    #: *Carried*: when the current overflow episode began (managed overflow, a queue, or a
    #: rented replica the traffic needs); None between episodes.
    episode_started_at: float | None = None
    #: *Carried*: the newest step that saw the episode active.
    episode_seen_at: float | None = None
    #: *Carried*: durations of the last finished episodes, seconds, oldest first (at most 32).
    #: With none, ``autoscaling.costs.expected_episode_s`` stands in.
    episodes_s: list[float] = field(default_factory=list)
    #: *Carried*: rented replicas found cheaper to release, and since when. Without it no
    #: replica is released by cost while ``release_after_s`` is above 0.
    cheaper_since: list[CheaperSince] = field(default_factory=list)


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
    #: The episode and release bookkeeping to carry into the next :class:`PlanInput`.
    episode_started_at: float | None = None
    episode_seen_at: float | None = None
    episodes_s: list[float] = field(default_factory=list)
    cheaper_since: list[CheaperSince] = field(default_factory=list)
