"""The replica supervisor: keeps inference servers running on this node's GPUs.

It starts replicas (checking the model path, the GPUs, the port first), watches each one
(process alive, ``/health``, load), restarts a crashed or unhealthy replica with exponential
backoff, reports a crash loop instead of hiding it, drains (SIGTERM: the server stops taking
work and finishes what it has) and stops replicas (SIGTERM to the process group, a monotonic
deadline, SIGKILL). One GPU never belongs to two live replicas. Every change is written to a
state file, so that an agent restarted on the same node adopts the replicas still running and
cleans up the rest instead of launching them twice.

Replicas outlive the agent process unless :meth:`Supervisor.close` is asked to stop them: a
node keeps serving while its agent restarts (fail static). This module speaks no gRPC and no
Temporal; the reporter and the node worker call it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.gpus import GpuInfo
from agent.ports import NoFreePort, pick_port, port_is_free
from agent.processes import ReplicaProcess
from agent.runtimes import LaunchSpec, Runtime, ServerClient, runtimes
from agent.status import ReplicaLoad, ReplicaState, ReplicaStatus

log = logging.getLogger(__name__)

STATE_FILE = "replicas.json"
STOPPED_KEPT_S = 60.0  # stopped replicas stay in reports this long, then are forgotten
_LIVE = (ReplicaState.STARTING, ReplicaState.HEALTHY, ReplicaState.CRASH_LOOPING)


# -- errors ------------------------------------------------------------------------------------


class ReplicaError(Exception):
    """A replica cannot be started, found or kept running; ``str()`` is the reason."""


class ModelPathMissing(ReplicaError):
    pass


class PortInUse(ReplicaError):
    pass


class GpuTaken(ReplicaError):
    pass


class UnknownGpu(ReplicaError):
    pass


class UnknownRuntime(ReplicaError):
    pass


class NeverHealthy(ReplicaError):
    pass


class ReplicaConflict(ReplicaError):
    """A replica with this id already runs with a different spec."""


class UnknownReplica(ReplicaError):
    pass


class NoPortLeft(ReplicaError):
    pass


# -- data --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """What to run: the same spec started twice is one replica."""

    replica_id: str
    deployment: str
    model_path: str
    served_model_name: str = ""  # default: the deployment name
    runtime: str = ""  # default: the supervisor's default runtime
    gpu_indices: tuple[int, ...] = ()
    port: int = 0  # 0: the supervisor picks a free port
    mem_fraction_static: float | None = None
    extra_args: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReplicaSpec:
        return cls(
            replica_id=str(data["replica_id"]),
            deployment=str(data["deployment"]),
            model_path=str(data["model_path"]),
            served_model_name=str(data.get("served_model_name", "")),
            runtime=str(data.get("runtime", "")),
            gpu_indices=tuple(int(i) for i in data.get("gpu_indices", ())),
            port=int(data.get("port", 0)),
            mem_fraction_static=data.get("mem_fraction_static"),
            extra_args=tuple(str(a) for a in data.get("extra_args", ())),
        )


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    state_dir: Path
    host: str = "127.0.0.1"  # where replicas listen
    port_range: tuple[int, int] = (30000, 30999)
    default_runtime: str = "sglang"
    python: str | None = None  # interpreter that launches replicas; default: this one
    health_interval_s: float = 2.0
    health_failures: int = 3  # consecutive failures before a healthy replica is declared dead
    start_timeout_s: float = 900.0
    stop_timeout_s: float = 30.0
    drain_timeout_s: float = 600.0
    restart_backoff_initial_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    crash_loop_restarts: int = 3  # this many crashes within the window: crash-looping
    crash_loop_window_s: float = 300.0
    #: SGLang's --api-key for every replica; None: the replicas take requests without one.
    api_key: str | None = None


@dataclass(eq=False)
class _Replica:
    spec: ReplicaSpec
    runtime: Runtime | None  # None: refused before it had one
    port: int
    gpu_model: str
    state: ReplicaState = ReplicaState.STARTING
    reason: str = ""
    restarts: int = 0
    ever_healthy: bool = False
    started_at: float | None = None
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    process: ReplicaProcess | None = None
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    task: asyncio.Task[None] | None = None
    stopped_at: float | None = None  # monotonic

    @property
    def live(self) -> bool:
        return self.state in _LIVE or self.state is ReplicaState.DRAINING

    def status(self) -> ReplicaStatus:
        holds = self.live
        return ReplicaStatus(
            replica_id=self.spec.replica_id,
            deployment=self.spec.deployment,
            model=self.spec.served_model_name or self.spec.deployment,
            runtime=self.runtime.name if self.runtime is not None else self.spec.runtime,
            port=self.port,
            gpu_indices=self.spec.gpu_indices if holds else (),
            state=self.state,
            state_reason=self.reason,
            load=self.load
            if self.state in (ReplicaState.HEALTHY, ReplicaState.DRAINING)
            else ReplicaLoad(),
            restarts=self.restarts,
            started_at=self.started_at,
        )


# -- the supervisor ----------------------------------------------------------------------------


class Supervisor:
    """Owns every replica on this node. Use from one asyncio event loop."""

    def __init__(
        self,
        settings: SupervisorSettings,
        gpus: Sequence[GpuInfo],
        runtime_table: Mapping[str, Runtime] | None = None,
    ) -> None:
        self.settings = settings
        self._gpus = {g.index: g for g in gpus}
        self._runtimes = dict(runtime_table or runtimes(settings.python))
        self._replicas: dict[str, _Replica] = {}
        self.state_path = settings.state_dir / STATE_FILE
        self.log_dir = settings.state_dir / "logs"

    # -- queries -------------------------------------------------------------------------------

    def statuses(self) -> list[ReplicaStatus]:
        """Every replica's state and load, for reports."""
        now = time.monotonic()
        for key, r in list(self._replicas.items()):
            if r.stopped_at is not None and now - r.stopped_at > STOPPED_KEPT_S:
                del self._replicas[key]
        return [r.status() for r in self._replicas.values()]

    def status(self, replica_id: str) -> ReplicaStatus:
        return self._get(replica_id).status()

    def pid(self, replica_id: str) -> int | None:
        process = self._get(replica_id).process
        return process.pid if process is not None else None

    def gpu_owners(self) -> dict[int, str]:
        return {
            index: r.spec.replica_id
            for r in self._replicas.values()
            if r.live
            for index in r.spec.gpu_indices
        }

    def log_path(self, replica_id: str) -> Path:
        return self.log_dir / f"{replica_id}.log"

    # -- start ---------------------------------------------------------------------------------

    def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Start a replica, or return the one already running with this exact spec.

        Raises a :class:`ReplicaError` subclass for input that can never work. Does not wait
        for health: see :meth:`wait_healthy`.
        """
        spec = self._normalise(spec)
        existing = self._replicas.get(spec.replica_id)
        if existing is not None and existing.live:
            if existing.spec != spec:
                raise ReplicaConflict(
                    f"replica {spec.replica_id} already runs with a different spec "
                    f"(deployment {existing.spec.deployment}, model {existing.spec.model_path}, "
                    f"GPUs {list(existing.spec.gpu_indices)})"
                )
            return existing.status()
        try:
            replica = self._admit(spec)
        except ReplicaError as exc:
            # Reported as a failed replica, so the reason reaches the scheduler too.
            self._replicas[spec.replica_id] = _Replica(
                spec=spec,
                runtime=None,
                port=spec.port,
                gpu_model="",
                state=ReplicaState.FAILED,
                reason=str(exc),
                stopped_at=time.monotonic(),
            )
            log.error("replica %s refused: %s", spec.replica_id, exc)
            raise
        self._replicas[spec.replica_id] = replica
        self._save()
        replica.task = asyncio.create_task(self._watch(replica), name=f"replica {spec.replica_id}")
        log.info(
            "starting replica %s (%s, %s) on GPUs %s port %d",
            spec.replica_id,
            spec.deployment,
            spec.runtime,
            list(spec.gpu_indices),
            replica.port,
        )
        return replica.status()

    def _normalise(self, spec: ReplicaSpec) -> ReplicaSpec:
        return replace(
            spec,
            runtime=spec.runtime or self.settings.default_runtime,
            served_model_name=spec.served_model_name or spec.deployment,
            gpu_indices=tuple(sorted(set(spec.gpu_indices))),
        )

    def _admit(self, spec: ReplicaSpec) -> _Replica:
        """Every check that can fail before a process exists. No await in here: the checks and
        the bookkeeping that follows them happen atomically on the event loop."""
        runtime = self._runtimes.get(spec.runtime)
        if runtime is None:
            raise UnknownRuntime(
                f"unknown runtime {spec.runtime!r}; expected one of {sorted(self._runtimes)}"
            )
        if not Path(spec.model_path).exists():
            raise ModelPathMissing(f"model path {spec.model_path} does not exist on this node")
        if runtime.name == "sglang" and not spec.gpu_indices:
            raise UnknownGpu("an sglang replica needs at least one GPU")
        unknown = [i for i in spec.gpu_indices if i not in self._gpus]
        if unknown:
            raise UnknownGpu(
                f"GPU {', '.join(map(str, unknown))} does not exist on this node "
                f"(it has GPUs {sorted(self._gpus) or 'none'})"
            )
        owners = self.gpu_owners()
        taken = {i: owners[i] for i in spec.gpu_indices if i in owners}
        if taken:
            held = ", ".join(f"GPU {i} is held by replica {o}" for i, o in sorted(taken.items()))
            raise GpuTaken(held)
        promised = {r.port for r in self._replicas.values() if r.live}
        host = self.settings.host
        if spec.port:
            if spec.port in promised or not port_is_free(host, spec.port):
                raise PortInUse(f"port {spec.port} on {host} is already in use")
            port = spec.port
        else:
            first, last = self.settings.port_range
            try:
                port = pick_port(host, first, last, promised)
            except NoFreePort as exc:
                raise NoPortLeft(str(exc)) from exc
        gpu_model = self._gpus[spec.gpu_indices[0]].model if spec.gpu_indices else ""
        return _Replica(spec=spec, runtime=runtime, port=port, gpu_model=gpu_model)

    async def wait_healthy(
        self,
        replica_id: str,
        timeout_s: float | None = None,
        tick: Callable[[ReplicaStatus], None] | None = None,
        poll_s: float = 0.1,
    ) -> ReplicaStatus:
        """Wait until the replica is healthy; raise :class:`NeverHealthy` with the reason if it
        fails, is stopped, or is not healthy within ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(replica_id)
            if tick is not None:
                tick(status)
            if status.state is ReplicaState.HEALTHY:
                return status
            if status.state in (ReplicaState.FAILED, ReplicaState.STOPPED):
                raise NeverHealthy(
                    f"replica {replica_id} {status.state.value}: {status.state_reason}"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise NeverHealthy(
                    f"replica {replica_id} not healthy after {timeout_s:g}s "
                    f"({status.state.value}: {status.state_reason or 'no reason given'})"
                )
            await asyncio.sleep(poll_s)

    # -- stop and drain ------------------------------------------------------------------------

    async def drain(self, replica_id: str, timeout_s: float | None = None) -> ReplicaStatus:
        """Stop taking new work and let in-flight requests finish (SIGTERM; SGLang drains),
        then SIGKILL the group if it has not exited within ``timeout_s``."""
        timeout = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        return await self._halt(replica_id, timeout, "drained")

    async def stop(self, replica_id: str, timeout_s: float | None = None) -> ReplicaStatus:
        """SIGTERM the replica's process group, SIGKILL it after ``timeout_s``. Idempotent."""
        timeout = self.settings.stop_timeout_s if timeout_s is None else timeout_s
        return await self._halt(replica_id, timeout, "stopped")

    async def _halt(self, replica_id: str, timeout_s: float, verb: str) -> ReplicaStatus:
        replica = self._get(replica_id)
        if not replica.live:
            return replica.status()
        replica.state = ReplicaState.DRAINING
        replica.reason = f"{verb} on request" if verb == "stopped" else "draining on request"
        self._save()
        if replica.task is not None:
            replica.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replica.task
        how = "was not running"
        if replica.process is not None and replica.process.alive():
            how = await replica.process.terminate(timeout_s)
        replica.state = ReplicaState.STOPPED
        replica.reason = f"{verb}: {how}"
        replica.stopped_at = time.monotonic()
        self._save()
        log.info("replica %s %s", replica_id, replica.reason)
        return replica.status()

    async def close(self, stop_replicas: bool) -> None:
        """Stop watching (the agent is exiting). Replicas keep running unless
        ``stop_replicas``; the state file lets the next agent adopt them."""
        if stop_replicas:
            await asyncio.gather(*(self.stop(rid) for rid in list(self._replicas)))
        for replica in self._replicas.values():
            if replica.task is not None:
                replica.task.cancel()
        tasks = [r.task for r in self._replicas.values() if r.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._save()

    # -- adoption ------------------------------------------------------------------------------

    async def adopt(self) -> dict[str, str]:
        """Take over the replicas an earlier agent process left (from the state file).

        A replica whose process still runs is adopted as it is; one whose process is gone is
        started again; one that was being drained or stopped, or whose GPUs or runtime this
        node no longer has, is stopped and forgotten. Returns what happened to each.
        """
        try:
            records = json.loads(self.state_path.read_text()).get("replicas", [])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.error("ignoring unreadable replica state %s: %s", self.state_path, exc)
            return {}
        outcome: dict[str, str] = {}
        for record in records:
            try:
                spec = ReplicaSpec.from_json(record["spec"])
                pid, started = int(record.get("pid") or 0), record.get("started")
            except (KeyError, TypeError, ValueError) as exc:
                log.error("ignoring a malformed replica record %r: %s", record, exc)
                continue
            process = ReplicaProcess.adopt(pid, started) if pid else None
            state = record.get("state")
            problem = None
            runtime = self._runtimes.get(spec.runtime)
            if runtime is None:
                problem = f"runtime {spec.runtime!r} is unknown"
            elif any(i not in self._gpus for i in spec.gpu_indices):
                problem = "its GPUs are not on this node any more"
            elif state in ("draining", "stopped", "failed"):
                problem = f"it was {state}"
            if problem is not None or runtime is None:
                if process is not None:
                    await process.terminate(self.settings.stop_timeout_s)
                outcome[spec.replica_id] = f"cleaned up: {problem}"
                continue
            gpu_model = self._gpus[spec.gpu_indices[0]].model if spec.gpu_indices else ""
            replica = _Replica(
                spec=spec,
                runtime=runtime,
                port=int(record.get("port") or spec.port),
                gpu_model=gpu_model,
                restarts=int(record.get("restarts", 0)),
                ever_healthy=bool(record.get("ever_healthy", False)),
                started_at=record.get("started_at"),
                process=process,
            )
            if process is None:
                replica.reason = "was not running when the agent started; starting it again"
                outcome[spec.replica_id] = "restarted: its process was gone"
            else:
                replica.reason = f"adopted running process {process.pid}"
                outcome[spec.replica_id] = f"adopted: pid {process.pid}"
            self._replicas[spec.replica_id] = replica
            replica.task = asyncio.create_task(self._watch(replica))
        self._save()
        for replica_id, what in outcome.items():
            log.info("replica %s from the previous agent: %s", replica_id, what)
        return outcome

    # -- the watch loop ------------------------------------------------------------------------

    async def _watch(self, r: _Replica) -> None:
        while True:
            if r.process is None:
                failure = self._launch(r)
                if failure is not None:
                    r.state, r.reason = ReplicaState.FAILED, failure
                    r.stopped_at = time.monotonic()
                    self._save()
                    return
            # A client per launch: a restart may have moved the replica to another port.
            client = ServerClient(f"http://{_loopback(self.settings.host)}:{r.port}")
            try:
                crash = await self._supervise(r, client)
            finally:
                await client.close()
            if crash is None:
                return  # failed for good
            if not await self._after_crash(r, crash):
                return

    def _launch(self, r: _Replica) -> str | None:
        spec = r.spec
        assert r.runtime is not None
        launch = LaunchSpec(
            model_path=Path(spec.model_path),
            served_model_name=spec.served_model_name,
            host=self.settings.host,
            port=r.port,
            gpu_indices=spec.gpu_indices,
            gpu_model=r.gpu_model,
            mem_fraction_static=spec.mem_fraction_static,
            extra_args=spec.extra_args,
            api_key=self.settings.api_key,
        )
        try:
            command = r.runtime.command(launch)
            env = r.runtime.environment(launch, os.environ)
            r.process = ReplicaProcess.spawn(command, env, self.log_path(spec.replica_id))
        except (OSError, ValueError) as exc:
            return f"cannot launch: {exc}"
        r.started_at = time.time()
        r.load = ReplicaLoad()
        self._save()
        log.info("replica %s launched as pid %d", spec.replica_id, r.process.pid)
        return None

    async def _supervise(self, r: _Replica, client: ServerClient) -> str | None:
        """Watch a running process. Returns why it has to be restarted, or None when the
        replica has failed for good."""
        assert r.process is not None
        settings = self.settings
        launched = time.monotonic()
        failures = 0
        while True:
            await asyncio.sleep(settings.health_interval_s)
            if not r.process.alive():
                return r.process.exit_reason + self._last_log_line(r)
            health = await client.health()
            if health.ok:
                failures = 0
                if r.state is not ReplicaState.HEALTHY:
                    r.state, r.reason, r.ever_healthy = ReplicaState.HEALTHY, "", True
                    self._save()
                    log.info("replica %s is healthy on port %d", r.spec.replica_id, r.port)
                r.load = await client.load() or r.load
                continue
            if r.state is ReplicaState.HEALTHY:
                failures += 1
                if failures >= settings.health_failures:
                    await r.process.terminate(settings.stop_timeout_s)
                    return f"health check failed {failures} times in a row ({health.detail})"
            elif time.monotonic() - launched > settings.start_timeout_s:
                await r.process.terminate(settings.stop_timeout_s)
                r.state = ReplicaState.FAILED
                r.reason = (
                    f"never became healthy within {settings.start_timeout_s:g}s "
                    f"(last: {health.detail})"
                )
                r.stopped_at = time.monotonic()
                self._save()
                log.error("replica %s failed: %s", r.spec.replica_id, r.reason)
                return None

    async def _after_crash(self, r: _Replica, crash: str) -> bool:
        """Record a crash and wait out the backoff. False when the replica gives up."""
        settings = self.settings
        now = time.monotonic()
        r.crashes.append(now)
        while r.crashes and now - r.crashes[0] > settings.crash_loop_window_s:
            r.crashes.popleft()
        r.process = None
        r.load = ReplicaLoad()
        count = len(r.crashes)
        if not r.ever_healthy and count >= settings.crash_loop_restarts:
            r.state = ReplicaState.FAILED
            r.reason = f"{crash}; failed {count} times without ever becoming healthy"
            r.stopped_at = now
            self._save()
            log.error("replica %s failed: %s", r.spec.replica_id, r.reason)
            return False
        delay = min(
            settings.restart_backoff_max_s,
            settings.restart_backoff_initial_s * 2 ** (count - 1),
        )
        r.restarts += 1
        if count >= settings.crash_loop_restarts:
            r.state = ReplicaState.CRASH_LOOPING
            r.reason = (
                f"{crash}; {count} crashes in {settings.crash_loop_window_s:g}s, "
                f"next restart in {delay:.1f}s"
            )
        else:
            r.state = ReplicaState.STARTING
            r.reason = f"{crash}; restarting in {delay:.1f}s"
        self._save()
        log.warning("replica %s: %s", r.spec.replica_id, r.reason)
        await asyncio.sleep(delay)
        self._repick_port(r, in_use="address already in use" in crash.lower())
        return True

    def _repick_port(self, r: _Replica, in_use: bool = False) -> None:
        """A port this agent picked may have been taken meanwhile (another agent on the host
        raced for it): pick again rather than crash on it forever. Asked-for ports stay.

        After a crash on a port in use, the port is left whatever it looks like now (the other
        server may be between restarts), and the search starts at a place of this replica's
        own, so that two agents that raced for one port do not race again for the next."""
        host = self.settings.host
        if r.spec.port or (not in_use and port_is_free(host, r.port)):
            return
        promised = {x.port for x in self._replicas.values() if x.live and x is not r}
        first, last = self.settings.port_range
        spread = int.from_bytes(hashlib.sha256(r.spec.replica_id.encode()).digest()[:4], "big")
        try:
            port = pick_port(host, first, last, promised | {r.port}, start=first + spread)
        except NoFreePort:
            return
        log.warning("replica %s: port %d is taken; moving to %d", r.spec.replica_id, r.port, port)
        r.port = port

    # -- helpers -------------------------------------------------------------------------------

    def _get(self, replica_id: str) -> _Replica:
        replica = self._replicas.get(replica_id)
        if replica is None:
            raise UnknownReplica(f"no replica {replica_id} on this node")
        return replica

    def _last_log_line(self, r: _Replica) -> str:
        try:
            with self.log_path(r.spec.replica_id).open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 4096))
                lines = handle.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1].strip()[:200]}" if lines else ""

    def _save(self) -> None:
        records = []
        for r in self._replicas.values():
            if r.state is ReplicaState.STOPPED:
                continue
            records.append(
                {
                    "spec": asdict(r.spec),
                    "port": r.port,
                    "pid": r.process.pid if r.process is not None else None,
                    "started": r.process.started if r.process is not None else None,
                    "state": r.state.value,
                    "restarts": r.restarts,
                    "ever_healthy": r.ever_healthy,
                    "started_at": r.started_at,
                }
            )
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "replicas": records}, indent=2))
        os.replace(tmp, self.state_path)


def _loopback(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
