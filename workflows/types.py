"""The dataclasses workflows and activities take and return: one in, one out for each.

Plain dataclasses of plain fields (str, numbers, lists, nested dataclasses), so Temporal's JSON
converter carries them and fields can be added later with defaults. The node activities'
inputs mirror the agent's own dataclasses field by field (the agent owns those; a test checks
they agree): workflows call node activities by name and never import agent code.

Nothing here may do I/O or import anything heavier than the standard library: the workflow
sandbox imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from decisions.plantypes import (
    CheaperSince,
    OfferChoice,
    PendingReplica,
    PlannedRelease,
    ReplicaTemplate,
    SamplePoint,
    Timeouts,
)

#: Application error types that mean "this offer cannot be had now; try the next one".
TRY_NEXT_OFFER = ("CapacityError", "QuotaError", "UnknownSkuError", "UnknownRegionError")


@dataclass
class DeploymentInput:
    deployment: str
    samples: list[SamplePoint] = field(default_factory=list)
    last_change_at: float | None = None
    pending: list[PendingReplica] = field(default_factory=list)
    releasing: list[str] = field(default_factory=list)
    hold_until: float = 0.0
    recent: list[str] = field(default_factory=list)
    runs: int = 0
    released: list[str] = field(default_factory=list)
    #: The overflow episodes and the release bookkeeping ``plan_step`` carries between ticks.
    episode_started_at: float | None = None
    episode_seen_at: float | None = None
    episodes_s: list[float] = field(default_factory=list)
    cheaper_since: list[CheaperSince] = field(default_factory=list)
    #: Ticks per run before continuing as new; 0: the workflow's default (``TICKS_PER_HISTORY``).
    ticks_per_history: int = 0


@dataclass
class DeploymentStatus:
    """What ``query state`` answers: the deployment as its workflow sees it."""

    deployment: str
    policy_digest: str = ""
    current: int = 0
    desired: int = 0
    reason: str = ""
    lock_error: str = ""
    signal: float | None = None
    #: Notes of the newest plan (agents outside the lock, a refused policy edit, ...).
    notes: list[str] = field(default_factory=list)
    pending: list[PendingReplica] = field(default_factory=list)
    releasing: list[str] = field(default_factory=list)
    #: Replicas released lately: their agents may linger in the fleet as stale for a while.
    released: list[str] = field(default_factory=list)
    hold_until: float = 0.0
    #: The newest events, oldest first: decisions, provisions and releases with their outcome.
    recent: list[str] = field(default_factory=list)
    ticks: int = 0


@dataclass
class PolicyChanged:
    digest: str


# -- provision --------------------------------------------------------------------------------


@dataclass
class ProvisionInput:
    parent_id: str
    replica_id: str
    template: ReplicaTemplate
    where: str  # "reserved" or "cloud"
    agent_id: str = ""
    gpu_indices: list[int] = field(default_factory=list)
    offers: list[OfferChoice] = field(default_factory=list)
    timeouts: Timeouts = field(default_factory=Timeouts)
    weights_dir: str = ""
    #: Another endpoint for the weights' object store (an S3-compatible one, tests).
    weights_endpoint_url: str = ""


@dataclass
class ProvisionResult:
    replica_id: str
    ok: bool
    workflow_id: str = ""
    agent_id: str = ""
    cloud: str = ""
    key: str = ""
    instance_type: str = ""
    region: str = ""
    usd_per_hour: float = 0.0
    #: One line per offer tried or step failed, in order.
    attempts: list[str] = field(default_factory=list)
    error: str = ""
    #: The machine was a stopped one of the warm pool, started again (not launched).
    warm: bool = False


@dataclass
class LaunchInput:
    deployment: str
    key: str
    offer: OfferChoice


@dataclass
class LaunchOutput:
    key: str
    cloud: str
    instance_id: str
    region: str
    zone: str
    instance_type: str


@dataclass
class WaitAgentInput:
    key: str
    timeout_s: float


@dataclass
class WaitAgentOutput:
    agent_id: str
    gpu_indices: list[int] = field(default_factory=list)


@dataclass
class WaitReplicaInput:
    agent_id: str
    replica_id: str
    timeout_s: float


@dataclass
class WaitReplicaOutput:
    replica_id: str
    state: str


@dataclass
class TerminateInput:
    cloud: str
    key: str
    reason: str = ""


@dataclass
class TerminateOutput:
    key: str
    terminated: bool


@dataclass
class WarmStartInput:
    """Start a stopped machine of the deployment's warm pool for the provision ``claim``."""

    deployment: str
    #: The provision's workflow id: written on the machine before it is started.
    claim: str


@dataclass
class WarmStartOutput:
    #: The machine started (None: none fit; the provision launches a new one).
    machine: LaunchOutput | None = None
    usd_per_hour: float = 0.0
    #: What happened, for the provision's attempts.
    note: str = ""


@dataclass
class ReleaseMachineInput:
    """Stop (into the warm pool) or terminate the machine of a released replica."""

    cloud: str
    key: str
    deployment: str
    replica_id: str
    #: When it was released (workflow time): the warm label's value, the same on every retry.
    since: float
    reason: str = ""


@dataclass
class ReleaseMachineOutput:
    key: str
    stopped: bool = False
    terminated: bool = False
    #: What happened to the machine and why, in a few words.
    outcome: str = ""


# -- node activities (run by the agent's worker on ``agent-<id>``) ------------------------------


@dataclass
class PrefetchWeightsArgs:
    source: str
    destination: str
    files: list[str] = field(default_factory=list)
    endpoint_url: str | None = None
    connections: int | None = None
    range_size: int | None = None
    retries: int = 6
    fsync: bool = True


@dataclass
class StartReplicaArgs:
    replica_id: str
    deployment: str
    model_path: str
    gpu_indices: list[int]
    served_model_name: str = ""
    runtime: str = ""
    port: int = 0
    mem_fraction_static: float | None = None
    extra_args: list[str] = field(default_factory=list)
    healthy_timeout_s: float | None = None


@dataclass
class DrainReplicaArgs:
    replica_id: str
    timeout_s: float | None = None


@dataclass
class StopReplicaArgs:
    replica_id: str
    timeout_s: float | None = None


# -- release and the sweeper ------------------------------------------------------------------


@dataclass
class ReleaseInput:
    parent_id: str
    deployment: str
    release: PlannedRelease
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass
class DrainAtGatewaysInput:
    """Stop the gateways routing to ``replica_id`` and wait (at most ``deadline_s``) until
    none has a request in flight to it."""

    replica_id: str
    deadline_s: float


@dataclass
class DrainAtGatewaysOutput:
    replica_id: str
    #: Requests still in flight to the replica at the gateways when the activity returned
    #: (0 unless the deadline passed).
    in_flight: int = 0
    #: Gateways that reported within the last two report intervals (those waited for).
    gateways: int = 0
    #: Whether the fleet state knew the replica (and so could show it DRAINING).
    marked: bool = False


@dataclass
class ReleaseResult:
    replica_id: str
    drained: str
    terminated: bool
    reason: str = ""
    #: Requests the gateways still had in flight to the replica when its drain began.
    gateway_in_flight: int = 0
    #: The machine was stopped into the warm pool (not terminated).
    stopped: bool = False
    #: What happened to the machine, for the deployment's events ("" before the warm pool).
    machine: str = ""


@dataclass
class ManagedMachine:
    cloud: str
    key: str
    instance_id: str
    region: str
    #: Why it is not a leak; empty when nobody owns it.
    owner: str = ""
    #: Why it must be terminated now whoever owns it (a warm machine past its pool's
    #: bounds); empty otherwise.
    expire: str = ""


@dataclass
class FindMachinesInput:
    pass


@dataclass
class FindMachinesOutput:
    machines: list[ManagedMachine] = field(default_factory=list)
    #: Clouds that could not be listed this time, with the error.
    errors: list[str] = field(default_factory=list)
    now: float = 0.0


@dataclass
class SweeperInput:
    every_s: float = 60.0
    grace_s: float = 900.0
    #: key -> when it was first seen without an owner.
    unowned_since: dict[str, float] = field(default_factory=dict)
    terminated: list[str] = field(default_factory=list)
    runs: int = 0


@dataclass
class SweeperStatus:
    unowned_since: dict[str, float] = field(default_factory=dict)
    terminated: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
