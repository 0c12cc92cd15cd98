"""The scheduler's gRPC server: agents register and stream reports; operators read the fleet;
gateways watch the fleet they may route to and report their traffic.

Each service takes its own role's token (``agent``, ``operator``, ``gateway``) and refuses the
others (:mod:`scheduler.guard`); the handlers are in :mod:`scheduler.agentservice` and
:mod:`scheduler.gatewayservice`, the bounds on open streams in :mod:`scheduler.streams`.
:class:`SchedulerService` puts them together over one fleet; :class:`Scheduler` serves them.

Besides serving, a scheduler reloads the tokens file off the event loop every
``tokens_reload_every_s`` and ends every stream whose token is gone; closes Report streams that
were silent past the silence limit; and forgets agents and gateways that are gone.

A start that cannot listen (the gRPC or the metrics address in use, a host that is not this
machine's, a port it may not bind) raises :class:`~common.configfile.InputError` with one line
naming the field and address, after undoing whatever had started.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.configfile import InputError, read_secret
from common.v1 import agent_pb2 as pb
from scheduler.agentservice import ACK_EVERY, AgentService
from scheduler.auth import TokenStore
from scheduler.config import SchedulerConfig
from scheduler.fleet import FleetState
from scheduler.gatewayservice import WATCH_COALESCE_S, GatewayService
from scheduler.guard import TRANSPORT_LIMIT_FACTOR, Guard, Malformed, lenient_decoder
from scheduler.metrics import DelayHistogram
from scheduler.streams import StreamRegistry

if TYPE_CHECKING:
    from scheduler.policystore import PolicyStore

__all__ = ["ACK_EVERY", "WATCH_COALESCE_S", "Malformed", "Scheduler", "SchedulerService"]

log = logging.getLogger(__name__)

AGENT_SERVICE = "spillway.v1.AgentService"
FLEET_SERVICE = "spillway.v1.FleetService"
GATEWAY_SERVICE = "spillway.v1.GatewayService"


class SchedulerService:
    """AgentService, FleetService and GatewayService over one :class:`FleetState`, with the
    counts the metrics read."""

    def __init__(self, fleet: FleetState, tokens: TokenStore, instance: str) -> None:
        self.fleet = fleet
        self.tokens = tokens
        self.instance = instance
        self.guard = Guard(tokens)
        #: Report streams silent this long are closed, and their agent id may be taken over.
        silence = max(fleet.stale_after_s, 2 * fleet.report_interval_s)
        self.streams = StreamRegistry(silence)
        self.agents = AgentService(fleet, self.guard, self.streams, instance)
        self.gateways = GatewayService(fleet, self.guard, self.streams, instance)
        #: The policy store when this scheduler also runs the control plane (for metrics).
        self.policy_store: PolicyStore | None = None

    @property
    def rejected(self) -> Mapping[str, int]:
        """Calls refused, by status code name (every one, however few were logged)."""
        return self.guard.rejected

    @property
    def open_streams(self) -> int:
        return self.streams.open_reports

    @property
    def open_watches(self) -> int:
        return self.streams.open_watches

    @property
    def report_delay(self) -> DelayHistogram:
        return self.agents.report_delay

    def routable_fleet(self) -> pb.RoutableFleet:
        return self.gateways.routable_fleet()

    def enforce_tokens(self) -> None:
        """End every open stream whose token is no longer in the tokens file (or names someone
        else now). Called after every tokens reload."""
        for stream in self.streams.revoked(self.tokens.principal_of):
            principal = stream.principal
            log.warning(
                "ending the %s stream of %s %s from %s: its token was revoked",
                stream.kind,
                principal.role,
                principal.id,
                stream.peer,
            )
            stream.close(grpc.StatusCode.UNAUTHENTICATED, "the token was revoked")
            self.streams.forget(stream)

    def close_silent(self) -> None:
        """Close Report streams whose agent sent nothing for the silence limit."""
        limit = self.streams.silence_limit_s
        for stream in self.streams.silent():
            log.warning(
                "closing the report stream of agent %s from %s: nothing for %.1fs",
                stream.principal.id,
                stream.peer,
                limit,
            )
            stream.close(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no report for {limit:.1f}s (the stale limit); the stream is closed",
            )
            self.streams.forget(stream)

    def handlers(self, max_bytes: int) -> list[grpc.GenericRpcHandler[Any, Any]]:
        agents, gateways = self.agents, self.gateways
        agent = grpc.method_handlers_generic_handler(
            AGENT_SERVICE,
            {
                "Register": grpc.unary_unary_rpc_method_handler(
                    agents.register,
                    request_deserializer=lenient_decoder(pb.RegisterRequest, max_bytes),
                    response_serializer=pb.RegisterResponse.SerializeToString,
                ),
                "Report": grpc.stream_stream_rpc_method_handler(
                    agents.report,
                    request_deserializer=lenient_decoder(pb.CapacityReport, max_bytes),
                    response_serializer=pb.ReportAck.SerializeToString,
                ),
            },
        )
        fleet = grpc.method_handlers_generic_handler(
            FLEET_SERVICE,
            {
                "GetFleet": grpc.unary_unary_rpc_method_handler(
                    agents.get_fleet,
                    request_deserializer=lenient_decoder(pb.GetFleetRequest, max_bytes),
                    response_serializer=pb.GetFleetResponse.SerializeToString,
                ),
            },
        )
        gateway = grpc.method_handlers_generic_handler(
            GATEWAY_SERVICE,
            {
                "WatchFleet": grpc.unary_stream_rpc_method_handler(
                    gateways.watch_fleet,
                    request_deserializer=lenient_decoder(pb.WatchFleetRequest, max_bytes),
                    response_serializer=pb.RoutableFleet.SerializeToString,
                ),
                "ReportTraffic": grpc.unary_unary_rpc_method_handler(
                    gateways.report_traffic,
                    request_deserializer=lenient_decoder(pb.GatewayReport, max_bytes),
                    response_serializer=pb.GatewayReportAck.SerializeToString,
                ),
            },
        )
        return [agent, fleet, gateway]


def check_can_listen(address: str, field: str) -> None:
    """Raise :class:`InputError` (one line, naming ``field``) when ``address`` (host:port)
    cannot be listened on now: gRPC would only say "Failed to bind" and log a line of its own.

    Port 0 always can. The probe binds with SO_REUSEADDR, as gRPC and prometheus_client do.
    """
    host, _, port_text = address.rpartition(":")
    port = int(port_text)
    if port == 0:
        return
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"{field} {address}: cannot resolve {host!r}: {exc.strerror}") from None
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise listen_error(field, address, exc) from None
                failures.append(exc)  # e.g. no IPv6 here: gRPC binds the other family
    if failures and len(failures) == len(infos):
        raise listen_error(field, address, failures[0])


def listen_error(field: str, address: str, exc: OSError) -> InputError:
    if exc.errno == errno.EADDRINUSE:
        why = "the address is already in use (another process holds the port)"
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "the host is not an address of this machine"
    else:
        why = exc.strerror or str(exc)
    return InputError(f"cannot listen on {address} ({field}): {why}")


class Scheduler:
    """A running scheduler: gRPC server, fleet state, sweeper, tokens watch, and optional
    metrics endpoint."""

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
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: Any = None

    async def start(self) -> None:
        """Listen and serve; :class:`InputError` (and nothing left running) when it cannot."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        config = self.config
        limit = config.max_message_bytes
        check_can_listen(config.listen, "listen")
        if config.metrics_listen is not None:
            check_can_listen(config.metrics_listen, "metrics_listen")
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit * TRANSPORT_LIMIT_FACTOR),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        )
        self._server = server
        server.add_generic_rpc_handlers(self.service.handlers(limit))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            if config.tls is None:
                self.port = server.add_insecure_port(config.listen)
            else:
                self.port = server.add_secure_port(config.listen, self._credentials())
        except RuntimeError as exc:  # "Failed to bind": lost a race with another process
            raise InputError(f"cannot listen on {config.listen} (listen): {exc}") from None
        await server.start()
        if config.metrics_listen is not None:
            from scheduler.metrics import start_metrics_server

            try:
                self._metrics_server, self.metrics_port = start_metrics_server(
                    config.metrics_listen, self.fleet, self.service
                )
            except OSError as exc:
                raise listen_error("metrics_listen", config.metrics_listen, exc) from None
        for service in ("", AGENT_SERVICE, FLEET_SERVICE, GATEWAY_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        tokens = self.service.tokens
        self._tasks = [
            asyncio.create_task(self._sweep_forever(), name="sweeper"),
            asyncio.create_task(
                tokens.watch(config.tokens_reload_every_s, self.service.enforce_tokens),
                name="tokens watch",
            ),
        ]
        log.info(
            "scheduler %s serving on port %d (%s), reports every %.2fs, %d tokens",
            self.instance,
            self.port,
            "mTLS"
            if config.tls and config.tls.client_ca_file
            else "TLS"
            if config.tls
            else "plaintext",
            config.report_interval_s,
            len(tokens),
        )

    def _credentials(self) -> grpc.ServerCredentials:
        tls = self.config.tls
        assert tls is not None
        ca = read_secret(tls.client_ca_file, "client CA") if tls.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(read_secret(tls.key_file, "TLS key"), read_secret(tls.cert_file, "TLS certificate"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    async def _sweep_forever(self) -> None:
        period = max(self.fleet.report_interval_s / 2, 0.05)
        while True:
            await asyncio.sleep(period)
            for agent_id in self.fleet.sweep():
                log.warning(
                    "agent %s is gone: no report for %.1fs", agent_id, self.fleet.gone_after_s
                )
            self.service.close_silent()
            self.service.guard.refusals.flush()

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._server is not None:
            await self._server.stop(grace)
