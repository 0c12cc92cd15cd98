"""AgentService (agents register and stream capacity reports) and FleetService (operators
read the fleet), over one :class:`~scheduler.fleet.FleetState`.

An agent id is held by one process at a time (the rule is in :mod:`scheduler.streams`); a
report is checked against the agent's registration (:func:`scheduler.messages.report_from_pb`)
and its sequence must increase within a stream. A report that fails a check ends its stream
with INVALID_ARGUMENT and is not applied; nothing else is disturbed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from common.v1 import agent_pb2 as pb
from scheduler.fleet import FleetState
from scheduler.guard import Context, Guard, Malformed
from scheduler.messages import (
    MAX_SEQUENCE,
    InvalidMessage,
    agent_status_to_pb,
    gateway_status_to_pb,
    registration_from_pb,
    report_from_pb,
)
from scheduler.metrics import DelayHistogram
from scheduler.streams import Refusal, StreamRegistry, instance_of, write_whole

log = logging.getLogger("scheduler.server")

# Acknowledge the first report of a stream and then every ACK_EVERY-th. An acknowledgement per
# report would cost the scheduler about a quarter of its time per report, for nothing: gRPC
# already tells the agent when the stream breaks.
ACK_EVERY = 10


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class AgentService:
    """Handlers of AgentService and FleetService."""

    def __init__(
        self, fleet: FleetState, guard: Guard, streams: StreamRegistry, instance: str
    ) -> None:
        self.fleet = fleet
        self.guard = guard
        self.streams = streams
        self.instance = instance
        self.report_delay = DelayHistogram()

    async def _instance(self, context: Context) -> str:
        try:
            return instance_of(context.invocation_metadata())
        except Refusal as refusal:
            await self.guard.reject(context, refusal.code, refusal.detail)

    async def _check_identity(self, context: Context, principal_id: str, agent_id: str) -> None:
        if agent_id != principal_id:
            await self.guard.reject(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token is bound to agent {principal_id!r}, not {agent_id[:64]!r}",
            )

    async def register(
        self, request: pb.RegisterRequest | Malformed, context: Context
    ) -> pb.RegisterResponse:
        guard = self.guard
        principal = (await guard.credential(context, "agent")).principal
        await guard.malformed(context, request)
        assert not isinstance(request, Malformed)
        await self._check_identity(context, principal.id, request.agent_id)
        instance = await self._instance(context)
        try:
            registration = registration_from_pb(request)
        except InvalidMessage as exc:
            await guard.reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            replaced = self.streams.check_register(principal.id, instance)
        except Refusal as refusal:
            await guard.reject(context, refusal.code, refusal.detail)
        if replaced is not None:
            silent = time.monotonic() - replaced.last_heard
            log.warning(
                "agent %s: process %s at %s takes the id over from process %s at %s, silent "
                "for %.1fs",
                principal.id,
                instance or "(unnamed)",
                context.peer(),
                replaced.instance or "(unnamed)",
                replaced.peer,
                silent,
            )
            replaced.close(
                grpc.StatusCode.ALREADY_EXISTS,
                f"agent {principal.id!r} was registered by another process after "
                f"{silent:.1f}s of silence on this stream",
            )
            self.streams.forget(replaced)
        self.fleet.register(registration, instance)
        labels = registration.labels
        log.info(
            "agent %s registered: %s %s pool %s, %d GPUs (%s), version %s, process %s",
            registration.agent_id,
            labels.provider,
            labels.region,
            labels.pool,
            len(registration.gpus),
            registration.gpu_source,
            registration.agent_version,
            instance or "(unnamed)",
        )
        return pb.RegisterResponse(
            report_interval=duration(self.fleet.report_interval_s),
            scheduler_instance=self.instance,
        )

    async def report(
        self, requests: AsyncIterator[pb.CapacityReport | Malformed], context: Context
    ) -> None:
        """The Report stream, as a coroutine that writes its acks (see :mod:`scheduler.streams`
        for why not an async generator)."""
        guard = self.guard
        credential = await guard.credential(context, "agent")
        agent_id = credential.principal.id
        instance = await self._instance(context)
        try:
            stream, replaced = self.streams.open_report(
                credential, instance, context.peer(), asyncio.current_task()
            )
        except Refusal as refusal:
            await guard.reject(context, refusal.code, refusal.detail)
        if replaced is not None:
            same = bool(instance) and replaced.instance == instance
            (log.info if same else log.warning)(
                "agent %s: a new report stream from %s replaces the one from %s (%s)",
                agent_id,
                context.peer(),
                replaced.peer,
                "the same process reconnecting"
                if same
                else f"process {replaced.instance or '(unnamed)'}, silent for "
                f"{time.monotonic() - replaced.last_heard:.1f}s",
            )
            replaced.close(
                grpc.StatusCode.ALREADY_EXISTS,
                f"replaced by a newer report stream of agent {agent_id!r} from {context.peer()}",
            )
        fleet = self.fleet
        interval = duration(fleet.report_interval_s)
        accepted = 0
        previous = -1
        heard = self.streams.heard
        try:
            async for request in requests:
                heard(stream)
                if isinstance(request, Malformed):
                    await guard.reject(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                if request.agent_id != agent_id:
                    await self._check_identity(context, agent_id, request.agent_id)
                record = fleet.get(agent_id)
                if record is None or record.instance != instance:
                    await guard.reject(
                        context,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"agent {agent_id!r} is not registered; register first"
                        if record is None
                        else f"agent {agent_id!r} was registered by another process; "
                        "register first",
                    )
                sequence = request.sequence
                if sequence <= previous or sequence > MAX_SEQUENCE:
                    await guard.reject(
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"sequence {sequence} must be greater than the previous report's "
                        f"({previous}) on this stream"
                        if sequence <= previous
                        else f"sequence {sequence} is larger than {MAX_SEQUENCE}",
                    )
                previous = sequence
                try:
                    report = report_from_pb(request, record.registration)
                except InvalidMessage as exc:
                    await guard.reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                fleet.apply(agent_id, report)
                self.report_delay.observe(time.time() - report.sent_at)
                if accepted % ACK_EVERY == 0:
                    await write_whole(
                        context, pb.ReportAck(sequence=sequence, report_interval=interval)
                    )
                accepted += 1
        except asyncio.CancelledError:
            if stream.closing is None:
                raise  # the client went away, or the server is stopping
            await guard.reject(context, *stream.closing)
        finally:
            self.streams.forget(stream)

    async def get_fleet(
        self, request: pb.GetFleetRequest | Malformed, context: Context
    ) -> pb.GetFleetResponse:
        await self.guard.credential(context, "operator")
        await self.guard.malformed(context, request)
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        fleet = self.fleet
        return pb.GetFleetResponse(
            agents=[agent_status_to_pb(rec, health) for rec, health in fleet.agents()],
            report_interval=duration(fleet.report_interval_s),
            scheduler_instance=self.instance,
            generated_at=now,
            gateways=[
                gateway_status_to_pb(g) for g in fleet.gateways(within_s=fleet.stale_after_s)
            ],
        )
