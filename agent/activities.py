"""Node-local Temporal activities: start, drain and stop a replica on this agent's GPUs.

Each takes one dataclass and returns one, so fields can be added later. They run on the
agent's own task queue (``agent-<agent_id>``) and call the supervisor. Input that can never work
(a model path that does not exist, a port in use, a GPU already taken, a replica that never
becomes healthy) ends in a non-retryable ``ApplicationError`` whose ``type`` names the problem
(``ModelPathMissing``, ``PortInUse``, ``GpuTaken``, ``NeverHealthy``, ...) and whose message is
the reason. Everything else is left to the workflow's retry policy. Starting is idempotent by
replica id, so an activity retried after a worker crash finds the replica it already started
(adopted by the restarted agent) instead of launching a second one.

This module must not decide anything: which replica runs where is the workflows' business.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from agent.status import ReplicaStatus
from agent.supervisor import ReplicaError, ReplicaSpec, Supervisor, UnknownReplica

HEARTBEAT_EVERY_S = 1.0


@dataclass
class StartReplicaInput:
    replica_id: str
    deployment: str
    model_path: str
    gpu_indices: list[int]
    served_model_name: str = ""
    runtime: str = ""  # empty: the agent's default runtime
    port: int = 0  # 0: the agent picks a free port
    mem_fraction_static: float | None = None
    extra_args: list[str] = field(default_factory=list)
    healthy_timeout_s: float | None = None  # None: the agent's start timeout


@dataclass
class StartReplicaResult:
    replica_id: str
    port: int
    pid: int  # 0 when unknown
    state: str
    restarts: int


@dataclass
class DrainReplicaInput:
    replica_id: str
    timeout_s: float | None = None  # None: the agent's drain timeout


@dataclass
class DrainReplicaResult:
    replica_id: str
    state: str
    reason: str


@dataclass
class StopReplicaInput:
    replica_id: str
    timeout_s: float | None = None  # None: the agent's stop timeout


@dataclass
class StopReplicaResult:
    replica_id: str
    state: str
    reason: str


def _refusal(exc: ReplicaError) -> ApplicationError:
    return ApplicationError(str(exc), type=type(exc).__name__, non_retryable=True)


def _progress(status: ReplicaStatus) -> dict[str, Any]:
    return {"state": status.state.value, "reason": status.state_reason, "port": status.port}


class NodeActivities:
    """The activities of one node, bound to its supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    @activity.defn(name="start_replica")
    async def start_replica(self, request: StartReplicaInput) -> StartReplicaResult:
        """Start the replica (or find it running) and return once it is healthy."""
        spec = ReplicaSpec(
            replica_id=request.replica_id,
            deployment=request.deployment,
            model_path=request.model_path,
            served_model_name=request.served_model_name,
            runtime=request.runtime,
            gpu_indices=tuple(request.gpu_indices),
            port=request.port,
            mem_fraction_static=request.mem_fraction_static,
            extra_args=tuple(request.extra_args),
        )
        try:
            self.supervisor.start(spec)
            status = await self.supervisor.wait_healthy(
                request.replica_id,
                request.healthy_timeout_s,
                tick=lambda s: activity.heartbeat(_progress(s)),
                poll_s=0.2,
            )
        except ReplicaError as exc:
            raise _refusal(exc) from exc
        return StartReplicaResult(
            replica_id=status.replica_id,
            port=status.port,
            pid=self.supervisor.pid(status.replica_id) or 0,
            state=status.state.value,
            restarts=status.restarts,
        )

    @activity.defn(name="drain_replica")
    async def drain_replica(self, request: DrainReplicaInput) -> DrainReplicaResult:
        """Let in-flight requests finish, then stop. A replica that is not here is drained."""
        try:
            status = await self._heartbeating(
                lambda: self.supervisor.drain(request.replica_id, request.timeout_s),
                request.replica_id,
            )
        except UnknownReplica as exc:
            return DrainReplicaResult(request.replica_id, "stopped", str(exc))
        return DrainReplicaResult(status.replica_id, status.state.value, status.state_reason)

    @activity.defn(name="stop_replica")
    async def stop_replica(self, request: StopReplicaInput) -> StopReplicaResult:
        """SIGTERM, deadline, SIGKILL. Idempotent: an unknown replica is already stopped."""
        try:
            status = await self._heartbeating(
                lambda: self.supervisor.stop(request.replica_id, request.timeout_s),
                request.replica_id,
            )
        except UnknownReplica as exc:
            return StopReplicaResult(request.replica_id, "stopped", str(exc))
        return StopReplicaResult(status.replica_id, status.state.value, status.state_reason)

    async def _heartbeating(self, action: Callable[[], Any], replica_id: str) -> ReplicaStatus:
        task: asyncio.Task[ReplicaStatus] = asyncio.ensure_future(action())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_S)
                if done:
                    return task.result()
                with contextlib.suppress(UnknownReplica):
                    activity.heartbeat(_progress(self.supervisor.status(replica_id)))
        finally:
            if not task.done():
                task.cancel()

    def all(self) -> list[Callable[..., Any]]:
        return [self.start_replica, self.drain_replica, self.stop_replica]
