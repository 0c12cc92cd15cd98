"""Fleet state: what the scheduler currently knows about every agent, rebuilt from reports.

This state is soft. Nothing here is persisted: after a restart the scheduler knows the fleet
again within one report interval, because every agent re-registers and reports. An agent that
has not been heard from for ``stale_after`` intervals is *stale* (shown, but not trusted for
placement); after ``gone_after`` intervals it is forgotten.

Plain dataclasses only; protobuf stops at the gRPC server. No I/O. The per-report types
(``Report``, ``GpuState``, ``Replica``, ``ReplicaLoad``) are built for every report on the hot
path and are not frozen, because frozen dataclasses cost about four times as much to construct;
treat them as read-only all the same.
"""

from __future__ import annotations

import enum
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


@dataclass(frozen=True, slots=True)
class PoolCapacity:
    pool: str
    agents: int
    gpus_free: int
    gpus_total: int


class FleetState:
    """Agents by id. Call :meth:`sweep` periodically to forget agents that are gone."""

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

    def register(self, registration: Registration) -> AgentRecord:
        """Add an agent or replace its registration (it may have restarted with new GPUs)."""
        now = self._clock()
        previous = self._agents.get(registration.agent_id)
        record = AgentRecord(registration, registered_at=self._wall(), last_seen=now)
        if previous is not None and previous.registration.gpus == registration.gpus:
            # Same machine reconnecting: keep its last report so the fleet view does not blink.
            record.report = previous.report
            record.last_report_at = previous.last_report_at
            record.reports_received = previous.reports_received
        self._agents[registration.agent_id] = record
        return record

    def get(self, agent_id: str) -> AgentRecord | None:
        return self._agents.get(agent_id)

    def apply(self, agent_id: str, report: Report) -> bool:
        """Record a report; False when the agent is not registered (it must register again)."""
        record = self._agents.get(agent_id)
        if record is None:
            return False
        now = self._clock()
        record.report = report
        record.last_seen = now
        record.last_report_at = self._wall()
        record.reports_received += 1
        self.reports_total += 1
        self._recent.append(now)
        return True

    def health(self, record: AgentRecord) -> AgentHealth:
        silent = self._clock() - record.last_seen
        return AgentHealth.STALE if silent > self.stale_after_s else AgentHealth.CONNECTED

    def sweep(self) -> list[str]:
        """Forget agents silent for longer than ``gone_after``; return their ids."""
        cutoff = self._clock() - self.gone_after_s
        gone = [aid for aid, rec in self._agents.items() if rec.last_seen < cutoff]
        for agent_id in gone:
            del self._agents[agent_id]
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
