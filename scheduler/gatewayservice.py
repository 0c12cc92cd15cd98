"""GatewayService: gateways watch the fleet they may route to and report their traffic.

A fleet watch sends the whole routable set when it opens, again as soon as the set or a
replica's state changes (:attr:`scheduler.fleet.FleetState.routable_version`, a burst of changes
coalesced over :data:`WATCH_COALESCE_S`), and at least once per report interval otherwise. One
gateway id may hold at most :data:`scheduler.streams.MAX_WATCHES_PER_GATEWAY` watches at once;
a watch ends when its token is revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from google.protobuf import timestamp_pb2

from common.v1 import agent_pb2 as pb
from scheduler.agentservice import duration
from scheduler.auth import Credential
from scheduler.fleet import FleetState
from scheduler.guard import Context, Guard, Malformed
from scheduler.messages import InvalidMessage, gateway_report_from_pb, routable_replicas_to_pb
from scheduler.streams import Refusal, StreamRegistry, write_whole

log = logging.getLogger("scheduler.server")

#: After a change, a fleet watch waits this long for more before it sends: a burst of changes
#: (every agent registering after a restart) becomes one message, not one per change.
WATCH_COALESCE_S = 0.02


class GatewayService:
    """Handlers of GatewayService over one fleet."""

    def __init__(
        self, fleet: FleetState, guard: Guard, streams: StreamRegistry, instance: str
    ) -> None:
        self.fleet = fleet
        self.guard = guard
        self.streams = streams
        self.instance = instance
        #: Set (and replaced) whenever the routable fleet changes; watches wait on it.
        self._fleet_changed = asyncio.Event()
        fleet.on_change = self._wake_watches

    def _wake_watches(self) -> None:
        changed, self._fleet_changed = self._fleet_changed, asyncio.Event()
        changed.set()

    async def _gateway(self, context: Context, request: object, gateway_id: str) -> Credential:
        """The gateway calling, refused unless the token is a gateway's and bound to
        ``gateway_id`` (empty: the token's own id)."""
        credential = await self.guard.credential(context, "gateway")
        await self.guard.malformed(context, request)
        principal = credential.principal
        if gateway_id and gateway_id != principal.id:
            await self.guard.reject(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token is bound to gateway {principal.id!r}, not {gateway_id[:64]!r}",
            )
        return credential

    def routable_fleet(self) -> pb.RoutableFleet:
        """What gateways may route to now: every replica of every connected agent."""
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        fleet = self.fleet
        return pb.RoutableFleet(
            replicas=routable_replicas_to_pb(fleet.agents(), fleet.state_of),
            report_interval=duration(fleet.report_interval_s),
            scheduler_instance=self.instance,
            generated_at=now,
        )

    async def watch_fleet(
        self, request: pb.WatchFleetRequest | Malformed, context: Context
    ) -> None:
        """The fleet watch, as a coroutine that writes (see :mod:`scheduler.streams`)."""
        gateway_id = "" if isinstance(request, Malformed) else request.gateway_id
        credential = await self._gateway(context, request, gateway_id)
        try:
            stream = self.streams.open_watch(credential, context.peer(), asyncio.current_task())
        except Refusal as refusal:
            await self.guard.reject(context, refusal.code, refusal.detail)
        log.info("gateway %s watches the fleet from %s", credential.principal.id, context.peer())
        interval = self.fleet.report_interval_s
        try:
            while True:
                changed = self._fleet_changed  # taken before building: no change is missed
                await write_whole(context, self.routable_fleet())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), interval)
                    await asyncio.sleep(WATCH_COALESCE_S)
        except asyncio.CancelledError:
            if stream.closing is None:
                raise  # the gateway went away, or the server is stopping
            await self.guard.reject(context, *stream.closing)
        finally:
            self.streams.forget(stream)

    async def report_traffic(
        self, request: pb.GatewayReport | Malformed, context: Context
    ) -> pb.GatewayReportAck:
        gateway_id = "" if isinstance(request, Malformed) else request.gateway_id
        principal = (await self._gateway(context, request, gateway_id)).principal
        assert not isinstance(request, Malformed)
        if not request.gateway_id:
            request.gateway_id = principal.id
        try:
            report = gateway_report_from_pb(request)
        except InvalidMessage as exc:
            await self.guard.reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.fleet.report_gateway(report)
        return pb.GatewayReportAck(report_interval=duration(self.fleet.report_interval_s))
