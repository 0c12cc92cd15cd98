"""The reporter: registers the agent with the scheduler and streams capacity reports.

It only dials out. After any disconnect (scheduler restart, network loss, refused token) it waits
a jittered exponential backoff and registers again; while it cannot reach the scheduler the node
keeps serving what it runs (fail static). Every call carries the reporter's own instance id (a
random id drawn when it is made, ``spillway-instance``): the scheduler lets one process at a
time hold an agent id, refuses a second one with the same id and token (ALREADY_EXISTS, retried
like any refusal), and lets this one replace its own stream after a network blip. Protobuf
messages are built here and nowhere else on the agent side.

With several schedulers (``scheduler.addresses``, active-active) the agent reports to every one
of them, each over its own channel and stream with its own backoff (:class:`SchedulerStream`),
so a slow or dead scheduler never delays the reports to another. Why all of them and not a
subset: any scheduler's control-plane worker may pick up any activity from the shared task
queue (a plan, a wait for an agent, the sweeper's census), and each answers from its own fleet
state, so every scheduler must see every agent within one report interval. A subset (say, each
agent to two of N, or to whichever one it reached first) would leave some scheduler blind to
some agents: its plan would count too few replicas and rent for replicas that are running,
and its sweeper would call a serving machine a leak. A report is a few hundred bytes per
interval; sending one per scheduler is cheaper than any scheme that relays them between
schedulers, and it keeps the schedulers independent of each other.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from agent.config import AgentConfig
from agent.gpus import GpuInfo, GpuInventory, GpuSample
from agent.status import ReplicaState, ReplicaStatus
from common.schedulerlink import Backoff, auth_metadata, open_channel
from common.v1 import agent_pb2 as pb
from common.v1 import agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 5.0

_REPLICA_STATES = {
    ReplicaState.STARTING: pb.REPLICA_STATE_STARTING,
    ReplicaState.HEALTHY: pb.REPLICA_STATE_HEALTHY,
    ReplicaState.DRAINING: pb.REPLICA_STATE_DRAINING,
    ReplicaState.CRASH_LOOPING: pb.REPLICA_STATE_CRASH_LOOPING,
    ReplicaState.FAILED: pb.REPLICA_STATE_FAILED,
    ReplicaState.STOPPED: pb.REPLICA_STATE_STOPPED,
}

ReplicaSource = Callable[[], Sequence[ReplicaStatus]]


def timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp from Unix seconds, exact to the nanosecond a float can carry."""
    whole = math.floor(unix_seconds)
    carry, nanos = divmod(round((unix_seconds - whole) * 1e9), 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=whole + carry, nanos=nanos)


def build_registration(
    config: AgentConfig, gpus: Sequence[GpuInfo], gpu_source: str, version: str, hostname: str
) -> pb.RegisterRequest:
    labels = config.labels
    return pb.RegisterRequest(
        agent_id=config.agent_id,
        agent_version=version,
        labels=pb.AgentLabels(
            pool=labels.pool,
            provider=labels.provider,
            region=labels.region,
            zone=labels.zone,
            residency_group=labels.residency_group,
            instance_id=labels.instance_id,
            extra=labels.extra,
        ),
        gpus=[
            pb.Gpu(
                index=g.index, uuid=g.uuid, model=g.model, memory_total_bytes=g.memory_total_bytes
            )
            for g in gpus
        ],
        gpu_source=gpu_source,
        hostname=hostname,
        task_queue=config.task_queue,
        advertise_host=config.advertise_host,
    )


def build_report(
    agent_id: str,
    sequence: int,
    samples: Sequence[GpuSample],
    replicas: Sequence[ReplicaStatus],
    now: float | None = None,
) -> pb.CapacityReport:
    owner = {index: r.replica_id for r in replicas for index in r.gpu_indices}
    return pb.CapacityReport(
        agent_id=agent_id,
        sequence=sequence,
        sent_at=timestamp(time.time() if now is None else now),
        gpus=[
            pb.GpuState(
                index=s.index,
                memory_used_bytes=s.memory_used_bytes,
                utilization=s.utilization,
                replica_id=owner.get(s.index, ""),
                healthy=s.healthy,
            )
            for s in samples
        ],
        replicas=[_replica(r) for r in replicas],
    )


#: The scheduler refuses a report whose free-text fields are longer than this (the contract).
MAX_TEXT = 256


def clip(text: str) -> str:
    """``text`` cut to fit :data:`MAX_TEXT`, marked as cut: a long reason must not cost the
    whole report."""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "\u2026"


def _replica(r: ReplicaStatus) -> pb.Replica:
    message = pb.Replica(
        replica_id=r.replica_id,
        deployment=r.deployment,
        model=clip(r.model),
        runtime=r.runtime,
        port=r.port,
        gpu_indices=r.gpu_indices,
        state=_REPLICA_STATES[r.state],
        state_reason=clip(r.state_reason),
        load=pb.ReplicaLoad(
            running_requests=r.load.running_requests,
            queued_requests=r.load.queued_requests,
            kv_cache_usage=r.load.kv_cache_usage,
            generation_tokens_per_second=r.load.generation_tokens_per_second,
            cache_hit_rate=r.load.cache_hit_rate,
            max_running_requests=r.load.max_running_requests,
        ),
        restarts=r.restarts,
    )
    if r.started_at is not None:
        message.started_at.CopyFrom(timestamp(r.started_at))
    return message


class SchedulerStream:
    """One registration and report stream to one scheduler, kept alive while :meth:`run` runs."""

    def __init__(self, reporter: Reporter, address: str, backoff: Backoff) -> None:
        self._reporter = reporter
        self.address = address
        self._backoff = backoff
        self.interval_s: float | None = None  # set by the scheduler
        self.scheduler_instance = ""
        self.registrations = 0
        self.reports_acked = 0
        self.connected = False
        self.last_error: str | None = None

    async def run(self) -> None:
        """Register and report until cancelled, reconnecting after every failure."""
        attempt = 0
        while True:
            registered_before = self.registrations
            try:
                await self._session()
                self.last_error = "the scheduler closed the report stream"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # a bug or a local problem; keep the agent alive
                log.exception("report session to %s failed", self.address)
                self.last_error = repr(exc)
            self.connected = False
            if self.registrations > registered_before:
                attempt = 0  # the link worked; start the backoff over
            # Once the scheduler has told us its interval, retrying once per interval costs it
            # no more than normal reporting does, so the wait never exceeds the interval.
            delay = self._backoff.delay(attempt, self.interval_s)
            attempt += 1
            log.warning(
                "lost the scheduler at %s (%s); retrying in %.2fs",
                self.address,
                self.last_error,
                delay,
            )
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        reporter = self._reporter
        config = reporter.config
        channel = open_channel(self.address, config.scheduler.tls)
        reader: asyncio.Task[None] | None = None
        try:
            stub = pb_grpc.AgentServiceStub(channel)
            registration = reporter.registration()
            response = await stub.Register(
                registration, metadata=reporter.metadata, timeout=REGISTER_TIMEOUT_S
            )
            self.interval_s = _seconds(response.report_interval) or DEFAULT_INTERVAL_S
            self.scheduler_instance = response.scheduler_instance
            self.registrations += 1
            self.connected = True
            log.info(
                "registered with scheduler %s at %s; reporting every %.2fs",
                response.scheduler_instance,
                self.address,
                self.interval_s,
            )
            # No request iterator: reports are written with call.write() as they are made.
            call = stub.Report(metadata=reporter.metadata)  # type: ignore[call-arg]
            reader = asyncio.create_task(self._read_acks(call))
            sequence = 0
            while True:
                sequence += 1
                await call.write(reporter.report(sequence))
                done, _ = await asyncio.wait({reader}, timeout=self.interval_s)
                if done:
                    reader.result()  # raises the stream's error, if any
                    return
        finally:
            if reader is not None:
                reader.cancel()
            await channel.close(grace=None)

    async def _read_acks(
        self, call: grpc.aio.StreamStreamCall[pb.CapacityReport, pb.ReportAck]
    ) -> None:
        async for ack in call:
            self.reports_acked += 1
            interval = _seconds(ack.report_interval)
            if interval and interval != self.interval_s:
                log.info("scheduler at %s asks for reports every %.2fs", self.address, interval)
                self.interval_s = interval


class Reporter:
    """Keeps a registration and report stream alive to every listed scheduler for as long as
    :meth:`run` runs (one :class:`SchedulerStream` each, see the module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        inventory: GpuInventory,
        token: str,
        replicas: ReplicaSource = lambda: (),
        *,
        version: str,
        hostname: str,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._inventory = inventory
        #: This process's id for the schedulers: the same for every Register and Report.
        self.instance = uuid.uuid4().hex[:16]
        self.metadata = auth_metadata(token, self.instance)
        self._replicas = replicas
        self._version = version
        self._hostname = hostname
        rng = rng or random.Random()
        r = config.reconnect
        #: One stream per scheduler, in the order the config lists them.
        self.streams = [
            SchedulerStream(
                self,
                address,
                Backoff(r.initial_backoff_s, r.max_backoff_s, random.Random(rng.random())),
            )
            for address in config.scheduler.address_list
        ]

    def registration(self) -> pb.RegisterRequest:
        return build_registration(
            self.config,
            self._inventory.gpus,
            self._inventory.source,
            self._version,
            self._hostname,
        )

    def report(self, sequence: int) -> pb.CapacityReport:
        return build_report(
            self.config.agent_id, sequence, self._inventory.sample(), self._replicas()
        )

    async def run(self) -> None:
        """Report to every scheduler until cancelled; each stream reconnects on its own."""
        tasks = [
            asyncio.create_task(stream.run(), name=f"reporter {stream.address}")
            for stream in self.streams
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- totals over the streams, for logs and tests ------------------------------------------

    @property
    def registrations(self) -> int:
        return sum(s.registrations for s in self.streams)

    @property
    def reports_acked(self) -> int:
        return sum(s.reports_acked for s in self.streams)

    @property
    def interval_s(self) -> float | None:
        """The shortest interval any scheduler asked for (None: none has answered yet)."""
        known = [s.interval_s for s in self.streams if s.interval_s is not None]
        return min(known) if known else None

    @property
    def scheduler_instance(self) -> str:
        """The instance of the first scheduler that answered."""
        return next((s.scheduler_instance for s in self.streams if s.scheduler_instance), "")

    @property
    def last_error(self) -> str | None:
        return next((s.last_error for s in self.streams if s.last_error), None)


def _seconds(duration: duration_pb2.Duration) -> float:
    return float(duration.seconds) + duration.nanos / 1e9
