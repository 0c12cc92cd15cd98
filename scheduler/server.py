"""The scheduler's gRPC server: agents register and stream reports; operators read the fleet;
gateways watch the fleet they may route to and report their traffic.

Each service takes its own role's token (``agent``, ``operator``, ``gateway``) and refuses the
others. A fleet watch sends the whole routable set when it opens, again as soon as the set or a
replica's state changes (:attr:`scheduler.fleet.FleetState.routable_version`, a burst of changes
coalesced over :data:`WATCH_COALESCE_S`), and at least once per report interval otherwise.

Requests are decoded here, not by gRPC, so that a message that is not valid protobuf, or is larger
than ``max_message_bytes``, is answered with INVALID_ARGUMENT (gRPC alone would answer INTERNAL or
RESOURCE_EXHAUSTED) and every other agent's stream carries on. Messages larger than four times
the limit are refused by the transport itself with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.configfile import read_secret
from common.v1 import agent_pb2 as pb
from scheduler.auth import Principal, TokenStore
from scheduler.config import SchedulerConfig
from scheduler.fleet import FleetState
from scheduler.messages import (
    InvalidMessage,
    agent_status_to_pb,
    gateway_report_from_pb,
    gateway_status_to_pb,
    registration_from_pb,
    report_from_pb,
    routable_replicas_to_pb,
)
from scheduler.metrics import DelayHistogram

if TYPE_CHECKING:
    from scheduler.policystore import PolicyStore

log = logging.getLogger(__name__)

AGENT_SERVICE = "spillway.v1.AgentService"
# Acknowledge the first report of a stream and then every ACK_EVERY-th. An acknowledgement per
# report would cost the scheduler about a quarter of its time per report, for nothing: gRPC
# already tells the agent when the stream breaks.
ACK_EVERY = 10
FLEET_SERVICE = "spillway.v1.FleetService"
GATEWAY_SERVICE = "spillway.v1.GatewayService"
#: After a change, a fleet watch waits this long for more before it sends: a burst of changes
#: (every agent registering after a restart) becomes one message, not one per change.
WATCH_COALESCE_S = 0.02
MessageT = TypeVar("MessageT", bound=Message)


@dataclass(frozen=True, slots=True)
class Malformed:
    """Stands in for a request that could not be decoded; the handler answers INVALID_ARGUMENT."""

    reason: str


def lenient_decoder(cls: type[MessageT], max_bytes: int) -> Callable[[bytes], MessageT | Malformed]:
    def decode(raw: bytes) -> MessageT | Malformed:
        if len(raw) > max_bytes:
            return Malformed(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            return Malformed(f"not a valid {cls.DESCRIPTOR.full_name}: {exc}")

    return decode


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class SchedulerService:
    """Handlers for AgentService, FleetService and GatewayService over one :class:`FleetState`."""

    def __init__(self, fleet: FleetState, tokens: TokenStore, instance: str) -> None:
        self.fleet = fleet
        self.tokens = tokens
        self.instance = instance
        self.rejected: Counter[str] = Counter()  # by status code name
        self.open_streams = 0
        self.open_watches = 0
        #: Set (and replaced) whenever the routable fleet changes; watches wait on it.
        self._fleet_changed = asyncio.Event()
        fleet.on_change = self._wake_watches
        self.report_delay = DelayHistogram()
        #: The policy store when this scheduler also runs the control plane (for metrics).
        self.policy_store: PolicyStore | None = None

    async def _reject(
        self, context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, detail: str
    ) -> NoReturn:
        self.rejected[code.name] += 1
        log.warning("refused a call from %s: %s: %s", context.peer(), code.name, detail)
        await context.abort(code, detail)
        raise AssertionError("unreachable: abort raises")

    async def _principal(self, context: grpc.aio.ServicerContext[Any, Any], role: str) -> Principal:
        principal = self.tokens.authenticate(context.invocation_metadata())
        if principal is None:
            await self._reject(
                context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token"
            )
        if principal.role != role:
            await self._reject(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"a token of role {principal.role!r} cannot call this method",
            )
        return principal

    def _wake_watches(self) -> None:
        changed, self._fleet_changed = self._fleet_changed, asyncio.Event()
        changed.set()

    async def _check_identity(
        self, context: grpc.aio.ServicerContext[Any, Any], principal: Principal, agent_id: str
    ) -> None:
        if agent_id != principal.id:
            await self._reject(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token is bound to agent {principal.id!r}, not {agent_id!r}",
            )

    async def register(
        self, request: pb.RegisterRequest | Malformed, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterResponse:
        principal = await self._principal(context, "agent")
        if isinstance(request, Malformed):
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        await self._check_identity(context, principal, request.agent_id)
        try:
            registration = registration_from_pb(request)
        except InvalidMessage as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.fleet.register(registration)
        labels = registration.labels
        log.info(
            "agent %s registered: %s %s pool %s, %d GPUs (%s), version %s",
            registration.agent_id,
            labels.provider,
            labels.region,
            labels.pool,
            len(registration.gpus),
            registration.gpu_source,
            registration.agent_version,
        )
        return pb.RegisterResponse(
            report_interval=_duration(self.fleet.report_interval_s),
            scheduler_instance=self.instance,
        )

    async def report(
        self,
        requests: AsyncIterator[pb.CapacityReport | Malformed],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ReportAck]:
        principal = await self._principal(context, "agent")
        interval = _duration(self.fleet.report_interval_s)
        accepted = 0
        self.open_streams += 1
        try:
            async for request in requests:
                if isinstance(request, Malformed):
                    await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                    return
                if request.agent_id != principal.id:
                    await self._check_identity(context, principal, request.agent_id)
                record = self.fleet.get(request.agent_id)
                if record is None:
                    await self._reject(
                        context,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"agent {request.agent_id!r} is not registered; register first",
                    )
                    return
                try:
                    report = report_from_pb(request, record.registration)
                except InvalidMessage as exc:
                    await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                self.fleet.apply(request.agent_id, report)
                self.report_delay.observe(time.time() - report.sent_at)
                if accepted % ACK_EVERY == 0:
                    yield pb.ReportAck(sequence=request.sequence, report_interval=interval)
                accepted += 1
        finally:
            self.open_streams -= 1

    async def get_fleet(
        self, request: pb.GetFleetRequest | Malformed, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetFleetResponse:
        await self._principal(context, "operator")
        if isinstance(request, Malformed):
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return pb.GetFleetResponse(
            agents=[agent_status_to_pb(rec, health) for rec, health in self.fleet.agents()],
            report_interval=_duration(self.fleet.report_interval_s),
            scheduler_instance=self.instance,
            generated_at=now,
            gateways=[
                gateway_status_to_pb(g)
                for g in self.fleet.gateways(within_s=self.fleet.stale_after_s)
            ],
        )

    async def _gateway(
        self, context: grpc.aio.ServicerContext[Any, Any], request: Any, gateway_id: str
    ) -> Principal:
        """The gateway calling, refused unless the token is a gateway's and bound to
        ``gateway_id`` (empty: the token's own id)."""
        principal = await self._principal(context, "gateway")
        if isinstance(request, Malformed):
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        if gateway_id and gateway_id != principal.id:
            await self._reject(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token is bound to gateway {principal.id!r}, not {gateway_id!r}",
            )
        return principal

    def routable_fleet(self) -> pb.RoutableFleet:
        """What gateways may route to now: every replica of every connected agent."""
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        fleet = self.fleet
        return pb.RoutableFleet(
            replicas=routable_replicas_to_pb(fleet.agents(), fleet.state_of),
            report_interval=_duration(fleet.report_interval_s),
            scheduler_instance=self.instance,
            generated_at=now,
        )

    async def watch_fleet(
        self, request: pb.WatchFleetRequest | Malformed, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.RoutableFleet]:
        gateway_id = "" if isinstance(request, Malformed) else request.gateway_id
        principal = await self._gateway(context, request, gateway_id)
        log.info("gateway %s watches the fleet from %s", principal.id, context.peer())
        interval = self.fleet.report_interval_s
        self.open_watches += 1
        try:
            while True:
                changed = self._fleet_changed  # taken before building: no change is missed
                yield self.routable_fleet()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), interval)
                    await asyncio.sleep(WATCH_COALESCE_S)
        finally:
            self.open_watches -= 1

    async def report_traffic(
        self, request: pb.GatewayReport | Malformed, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GatewayReportAck:
        gateway_id = "" if isinstance(request, Malformed) else request.gateway_id
        principal = await self._gateway(context, request, gateway_id)
        assert not isinstance(request, Malformed)
        if not request.gateway_id:
            request.gateway_id = principal.id
        try:
            report = gateway_report_from_pb(request)
        except InvalidMessage as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.fleet.report_gateway(report)
        return pb.GatewayReportAck(report_interval=_duration(self.fleet.report_interval_s))

    def handlers(self, max_bytes: int) -> list[grpc.GenericRpcHandler[Any, Any]]:
        agent = grpc.method_handlers_generic_handler(
            AGENT_SERVICE,
            {
                "Register": grpc.unary_unary_rpc_method_handler(
                    self.register,
                    request_deserializer=lenient_decoder(pb.RegisterRequest, max_bytes),
                    response_serializer=pb.RegisterResponse.SerializeToString,
                ),
                "Report": grpc.stream_stream_rpc_method_handler(
                    self.report,
                    request_deserializer=lenient_decoder(pb.CapacityReport, max_bytes),
                    response_serializer=pb.ReportAck.SerializeToString,
                ),
            },
        )
        fleet = grpc.method_handlers_generic_handler(
            FLEET_SERVICE,
            {
                "GetFleet": grpc.unary_unary_rpc_method_handler(
                    self.get_fleet,
                    request_deserializer=lenient_decoder(pb.GetFleetRequest, max_bytes),
                    response_serializer=pb.GetFleetResponse.SerializeToString,
                ),
            },
        )
        gateway = grpc.method_handlers_generic_handler(
            GATEWAY_SERVICE,
            {
                "WatchFleet": grpc.unary_stream_rpc_method_handler(
                    self.watch_fleet,
                    request_deserializer=lenient_decoder(pb.WatchFleetRequest, max_bytes),
                    response_serializer=pb.RoutableFleet.SerializeToString,
                ),
                "ReportTraffic": grpc.unary_unary_rpc_method_handler(
                    self.report_traffic,
                    request_deserializer=lenient_decoder(pb.GatewayReport, max_bytes),
                    response_serializer=pb.GatewayReportAck.SerializeToString,
                ),
            },
        )
        return [agent, fleet, gateway]


class Scheduler:
    """A running scheduler: gRPC server, fleet state, sweeper, and optional metrics endpoint."""

    def __init__(self, config: SchedulerConfig, tokens: TokenStore | None = None) -> None:
        self.config = config
        self.instance = uuid.uuid4().hex[:12]
        self.fleet = FleetState(
            config.report_interval_s, config.stale_after_intervals, config.gone_after_intervals
        )
        self.service = SchedulerService(
            self.fleet, tokens or TokenStore(config.tokens_file), self.instance
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._metrics_server: Any = None

    async def start(self) -> None:
        config = self.config
        limit = config.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit * 4),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        )
        server.add_generic_rpc_handlers(self.service.handlers(limit))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if config.tls is None:
            self.port = server.add_insecure_port(config.listen)
        else:
            tls = config.tls
            ca = read_secret(tls.client_ca_file, "client CA") if tls.client_ca_file else None
            credentials = grpc.ssl_server_credentials(
                [
                    (
                        read_secret(tls.key_file, "TLS key"),
                        read_secret(tls.cert_file, "TLS certificate"),
                    )
                ],
                root_certificates=ca,
                require_client_auth=ca is not None,
            )
            self.port = server.add_secure_port(config.listen, credentials)
        await server.start()
        self._server = server
        for service in ("", AGENT_SERVICE, FLEET_SERVICE, GATEWAY_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper = asyncio.create_task(self._sweep_forever())
        if config.metrics_listen is not None:
            from scheduler.metrics import start_metrics_server

            self._metrics_server, self.metrics_port = start_metrics_server(
                config.metrics_listen, self.fleet, self.service
            )
        log.info(
            "scheduler %s serving on port %d (%s), reports every %.2fs",
            self.instance,
            self.port,
            "mTLS"
            if config.tls and config.tls.client_ca_file
            else "TLS"
            if config.tls
            else "plaintext",
            config.report_interval_s,
        )

    async def _sweep_forever(self) -> None:
        period = max(self.fleet.report_interval_s / 2, 0.05)
        while True:
            await asyncio.sleep(period)
            for agent_id in self.fleet.sweep():
                log.warning(
                    "agent %s is gone: no report for %.1fs", agent_id, self.fleet.gone_after_s
                )

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._server is not None:
            await self._server.stop(grace)
