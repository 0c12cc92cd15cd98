"""Fleet state: what the scheduler currently knows about every agent and gateway, rebuilt from
reports.

This state is soft. Nothing here is persisted: after a restart the scheduler knows the fleet
again within one report interval, because every agent re-registers and reports and every
gateway reports its traffic. An agent (or gateway) that has not been heard from for
``stale_after`` intervals is *stale* (shown, but not trusted for placement or signals); after
``gone_after`` intervals it is forgotten.

What gateways may route to (every replica of every connected agent, in its state) carries a
:attr:`FleetState.routable_version` that moves whenever that set or a replica's state
changes, and ``on_change`` is called then, so that fleet watchers send at once instead of on
every report. A replica the control plane drains through the gateways is *marked* draining
here (:meth:`FleetState.mark_draining`) and shown DRAINING before its agent says so; the mark
goes when the replica leaves its agent's report or the agent is forgotten.

Plain dataclasses only; protobuf stops at the gRPC server. No I/O. The per-report types
(``Report``, ``GpuState``, ``Replica``, ``ReplicaLoad``) are built for every report on the hot
path and are not frozen, because frozen dataclasses cost about four times as much to construct;
treat them as read-only all the same.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from decisions.fleetview import ReplicaState


@dataclass(frozen=True, slots=True)
class Labels:
    pool: str
    provider: str
    region: str
    zone: str = ""
    residency_group: str = ""
    instance_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    uuid: str
    model: str
    memory_total_bytes: int


@dataclass(frozen=True, slots=True)
class Registration:
    agent_id: str
    agent_version: str
    labels: Labels
    gpus: tuple[Gpu, ...]
    gpu_source: str
    hostname: str
    task_queue: str
    #: Where gateways reach this agent's replicas; empty: :attr:`hostname`.
    advertise_host: str = ""

    @property
    def replica_host(self) -> str:
        """The host at which this agent's replicas answer HTTP."""
        return self.advertise_host or self.hostname


@dataclass(slots=True)
class GpuState:
    index: int
    memory_used_bytes: int
    utilization: float
    replica_id: str
    healthy: bool


@dataclass(slots=True)
class ReplicaLoad:
    running_requests: int
    queued_requests: int
    kv_cache_usage: float
    generation_tokens_per_second: float
    cache_hit_rate: float
    #: The server's own cap on running requests; 0 when unknown.
    max_running_requests: int = 0


@dataclass(slots=True)
class Replica:
    replica_id: str
    deployment: str
    model: str
    runtime: str
    port: int
    gpu_indices: tuple[int, ...]
    state: ReplicaState
    state_reason: str
    load: ReplicaLoad
    restarts: int
    started_at: float | None


@dataclass(slots=True)
class Report:
    sequence: int
    sent_at: float  # Unix time, by the agent's clock
    gpus: tuple[GpuState, ...]
    replicas: tuple[Replica, ...]


class AgentHealth(enum.Enum):
    CONNECTED = "connected"
    STALE = "stale"


@dataclass(slots=True)
class AgentRecord:
    registration: Registration
    registered_at: float  # Unix time
    last_seen: float  # monotonic
    last_report_at: float | None = None  # Unix time
    report: Report | None = None
    reports_received: int = 0
    #: The ``spillway-instance`` of the agent process that registered ("" when not sent); only
    #: that process's Report stream is applied.
    instance: str = ""

    @property
    def agent_id(self) -> str:
        return self.registration.agent_id

    def gpu_counts(self) -> tuple[int, int]:
        """(free, total): a GPU is free when it is healthy and no replica holds it."""
        total = len(self.registration.gpus)
        if self.report is None:
            return total, total
        free = sum(1 for g in self.report.gpus if g.healthy and not g.replica_id)
        return free, total


@dataclass(slots=True)
class TierTraffic:
    tier: str  # "reserved", "rented" or "managed"
    requests: int
    input_tokens: int
    output_tokens: int


@dataclass(slots=True)
class DeploymentTraffic:
    deployment: str
    queue_depth: int
    oldest_queued_s: float
    #: Requests in flight now, by target (replica id or managed endpoint name).
    in_flight: dict[str, int]
    tiers: tuple[TierTraffic, ...]
    overflow_tokens_per_s: float
    refused: int


@dataclass(slots=True)
class GatewayReport:
    gateway_id: str
    sent_at: float  # Unix time, by the gateway's clock
    deployments: tuple[DeploymentTraffic, ...]


@dataclass(slots=True)
class GatewayRecord:
    """The newest report of one gateway."""

    report: GatewayReport
    received_at: float  # Unix time
    last_seen: float  # monotonic

    @property
    def gateway_id(self) -> str:
        return self.report.gateway_id

    def in_flight(self, target: str) -> int:
        """Requests this gateway has in flight to ``target``, over all its deployments."""
        return sum(d.in_flight.get(target, 0) for d in self.report.deployments)


#: States a replica marked draining is shown DRAINING from.
DRAINABLE = (ReplicaState.HEALTHY, ReplicaState.STARTING, ReplicaState.UNKNOWN)


def _routable(report: Report | None) -> tuple[tuple[object, ...], ...]:
    """What a gateway routes by, of one agent's report: a change here is sent at once."""
    if report is None:
        return ()
    return tuple(
        (r.replica_id, r.deployment, r.port, r.state, r.load.max_running_requests)
        for r in report.replicas
    )


@dataclass(frozen=True, slots=True)
class PoolCapacity:
    pool: str
    agents: int
    gpus_free: int
    gpus_total: int


class FleetState:
    """Agents and gateways by id. Call :meth:`sweep` periodically: it forgets agents and
    gateways that are gone and notices agents that went stale."""

    RATE_WINDOW_S = 10.0

    def __init__(
        self,
        report_interval_s: float,
        stale_after_intervals: float,
        gone_after_intervals: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.report_interval_s = report_interval_s
        self.stale_after_s = stale_after_intervals * report_interval_s
        self.gone_after_s = gone_after_intervals * report_interval_s
        self._clock = clock
        self._wall = wall_clock
        self._agents: dict[str, AgentRecord] = {}
        self.reports_total = 0
        self._recent: deque[float] = deque()  # monotonic arrival times within RATE_WINDOW_S
        self._started = clock()
        self._gateways: dict[str, GatewayRecord] = {}
        #: replica id -> agent id, for replicas drained through the gateways.
        self._draining: dict[str, str] = {}
        self._stale_seen: frozenset[str] = frozenset()
        #: Moves whenever the routable set or a replica's state changes.
        self.routable_version = 0
        #: Called (in the caller's thread) every time ``routable_version`` moves.
        self.on_change: Callable[[], None] | None = None

    def _changed(self) -> None:
        self.routable_version += 1
        if self.on_change is not None:
            self.on_change()

    def register(self, registration: Registration, instance: str = "") -> AgentRecord:
        """Add an agent or replace its registration (it may have restarted with new GPUs);
        ``instance`` names the agent process that registered."""
        now = self._clock()
        previous = self._agents.get(registration.agent_id)
        record = AgentRecord(
            registration, registered_at=self._wall(), last_seen=now, instance=instance
        )
        if previous is not None and previous.registration.gpus == registration.gpus:
            # Same machine reconnecting: keep its last report so the fleet view does not blink.
            record.report = previous.report
            record.last_report_at = previous.last_report_at
            record.reports_received = previous.reports_received
        self._agents[registration.agent_id] = record
        self._changed()  # rare; it may bring a stale agent's replicas back, or new labels
        return record

    def get(self, agent_id: str) -> AgentRecord | None:
        return self._agents.get(agent_id)

    def apply(self, agent_id: str, report: Report) -> bool:
        """Record a report; False when the agent is not registered (it must register again)."""
        record = self._agents.get(agent_id)
        if record is None:
            return False
        now = self._clock()
        previous = record.report
        was_stale = now - record.last_seen > self.stale_after_s
        record.report = report
        record.last_seen = now
        record.last_report_at = self._wall()
        record.reports_received += 1
        self.reports_total += 1
        self._recent.append(now)
        if self._draining:
            self._unmark_gone(agent_id, report)
        if was_stale or previous is None or _routable(previous) != _routable(report):
            self._changed()
        return True

    def _unmark_gone(self, agent_id: str, report: Report) -> None:
        present = {r.replica_id for r in report.replicas}
        for replica_id, owner in list(self._draining.items()):
            if owner == agent_id and replica_id not in present:
                del self._draining[replica_id]

    def mark_draining(self, replica_id: str) -> bool:
        """Show ``replica_id`` as DRAINING to gateways from now until it leaves the fleet.

        False when no agent reports the replica (there is nothing to mark)."""
        for agent_id, record in self._agents.items():
            if record.report is None:
                continue
            if any(r.replica_id == replica_id for r in record.report.replicas):
                if self._draining.get(replica_id) != agent_id:
                    self._draining[replica_id] = agent_id
                    self._changed()
                return True
        return False

    def draining(self) -> frozenset[str]:
        """The replicas marked draining by :meth:`mark_draining`."""
        return frozenset(self._draining)

    def state_of(self, replica: Replica) -> ReplicaState:
        """The replica's state as the scheduler shows it: DRAINING while it is marked so."""
        if replica.replica_id in self._draining and replica.state in DRAINABLE:
            return ReplicaState.DRAINING
        return replica.state

    def now(self) -> float:
        """The monotonic clock ``last_seen`` times are read from."""
        return self._clock()

    def report_gateway(self, report: GatewayReport) -> GatewayRecord:
        """Keep ``report`` as the newest of its gateway."""
        record = GatewayRecord(report, received_at=self._wall(), last_seen=self._clock())
        self._gateways[report.gateway_id] = record
        return record

    def gateway_health(self, record: GatewayRecord) -> AgentHealth:
        silent = self._clock() - record.last_seen
        return AgentHealth.STALE if silent > self.stale_after_s else AgentHealth.CONNECTED

    def gateways(self, within_s: float | None = None) -> list[GatewayRecord]:
        """Every known gateway's newest report, sorted by id; with ``within_s``, only those
        received within the last ``within_s`` seconds."""
        cutoff = -math.inf if within_s is None else self._clock() - within_s
        return [rec for _, rec in sorted(self._gateways.items()) if rec.last_seen >= cutoff]

    def health(self, record: AgentRecord) -> AgentHealth:
        silent = self._clock() - record.last_seen
        return AgentHealth.STALE if silent > self.stale_after_s else AgentHealth.CONNECTED

    def sweep(self) -> list[str]:
        """Forget agents and gateways silent for longer than ``gone_after``; return the agents'
        ids. Agents that went stale since the last sweep move ``routable_version``: their
        replicas are no longer routable."""
        cutoff = self._clock() - self.gone_after_s
        gone = [aid for aid, rec in self._agents.items() if rec.last_seen < cutoff]
        for agent_id in gone:
            del self._agents[agent_id]
        for replica_id, owner in list(self._draining.items()):
            if owner not in self._agents:
                del self._draining[replica_id]
        for gateway_id in [g for g, rec in self._gateways.items() if rec.last_seen < cutoff]:
            del self._gateways[gateway_id]
        stale = frozenset(
            aid for aid, rec in self._agents.items() if self.health(rec) is AgentHealth.STALE
        )
        if stale != self._stale_seen:
            newly = bool(stale - self._stale_seen)
            self._stale_seen = stale
            if newly:
                self._changed()
        return gone

    def agents(self) -> list[tuple[AgentRecord, AgentHealth]]:
        """Every known agent with its health, sorted by id."""
        return [(rec, self.health(rec)) for _, rec in sorted(self._agents.items())]

    def pools(self) -> list[PoolCapacity]:
        """Agents and GPUs per pool, counting only agents that are not stale."""
        totals: dict[str, list[int]] = {}
        for record, health in self.agents():
            entry = totals.setdefault(record.registration.labels.pool, [0, 0, 0])
            if health is not AgentHealth.CONNECTED:
                continue
            free, total = record.gpu_counts()
            entry[0] += 1
            entry[1] += free
            entry[2] += total
        return [PoolCapacity(pool, *counts) for pool, counts in sorted(totals.items())]

    def reports_per_second(self) -> float:
        """Reports accepted per second over the last RATE_WINDOW_S (or since start, if less)."""
        now = self._clock()
        horizon = now - self.RATE_WINDOW_S
        while self._recent and self._recent[0] < horizon:
            self._recent.popleft()
        window = min(self.RATE_WINDOW_S, now - self._started)
        return len(self._recent) / window if window > 0 else 0.0
