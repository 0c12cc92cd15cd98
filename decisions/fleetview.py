"""The fleet as decisions see it: plain, frozen values built once per decision.

Placement, autoscaling, planning and routing read a :class:`FleetSnapshot`: per agent its
pool, where it runs, whether it is connected and which GPUs are free; per replica its
deployment, state and load; per deployment what the gateways see of it (:class:`GatewayLoad`:
their queue, in-flight requests and overflow to managed endpoints). A snapshot is a value, so
a decision made from it does not change when the fleet moves on. The control plane builds one
from its fleet state (:func:`scheduler.snapshot.snapshot_from_fleet`), the simulator from its
model.

No I/O, no clocks, nothing but the standard library.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class ReplicaState(enum.Enum):
    UNKNOWN = "unknown"
    STARTING = "starting"
    HEALTHY = "healthy"
    DRAINING = "draining"
    CRASH_LOOPING = "crash-looping"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class AgentView:
    agent_id: str
    pool: str
    provider: str
    region: str
    residency_group: str
    connected: bool
    gpus_total: int
    #: Indices of GPUs that are healthy and held by no replica.
    free_gpus: tuple[int, ...]
    instance_type: str = ""
    #: List price of the machine, USD per hour; 0 when unknown or owned.
    usd_per_hour: float = 0.0
    #: The launch key of the machine when Spillway rented it; empty otherwise.
    key: str = ""


@dataclass(frozen=True, slots=True)
class ReplicaView:
    replica_id: str
    deployment: str
    agent_id: str
    state: ReplicaState
    running_requests: int = 0
    queued_requests: int = 0
    kv_cache_usage: float = 0.0
    #: Output tokens per second the replica reports generating; 0 when unknown.
    generation_tokens_per_s: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.state is ReplicaState.HEALTHY

    @property
    def leaving(self) -> bool:
        """Draining, stopped or failed: not counted as capacity any more."""
        return self.state in (ReplicaState.DRAINING, ReplicaState.STOPPED, ReplicaState.FAILED)


@dataclass(frozen=True, slots=True)
class GatewayLoad:
    """One deployment's traffic as the gateways see it, summed over every gateway that
    reported recently. Treat ``in_flight`` as read-only."""

    #: Requests waiting in the gateways' queues now (all gateways together).
    queue_depth: int = 0
    #: How long the oldest of them has waited, seconds (the longest over the gateways).
    oldest_queued_s: float = 0.0
    #: Tokens per second the gateways send to managed endpoints (all gateways together).
    overflow_tokens_per_s: float = 0.0
    #: Requests in flight now, by target (replica id or managed endpoint name).
    in_flight: Mapping[str, int] = field(default_factory=dict)
    #: How many gateways the figures come from.
    gateways: int = 0


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    agents: tuple[AgentView, ...]
    replicas: tuple[ReplicaView, ...]
    #: Deployment name -> what the gateways see of it; empty when no gateway reports.
    gateway: Mapping[str, GatewayLoad] = field(default_factory=dict)

    def agent(self, agent_id: str) -> AgentView | None:
        for agent in self.agents:
            if agent.agent_id == agent_id:
                return agent
        return None
