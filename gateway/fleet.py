"""The gateway's link to the scheduler: the fleet watch, and the traffic reports sent back.

``GatewayService.WatchFleet`` streams the routable fleet as a whole set; :class:`FleetView`
keeps the newest one as plain values. ``ReportTraffic`` carries what the gateway saw, once per
report interval (the interval is the scheduler's, from its answers). The gateway only dials out.

Fail static: when the stream breaks (scheduler restart, network loss, refused token) the last
fleet stays in force and the link reconnects after a jittered exponential backoff; a restarted
scheduler knows no replica until the agents report again, so for two report intervals after a
new scheduler instance answers, replicas it does not list yet are kept. Protobuf messages are
built and read here and nowhere else in the gateway.

The channel, TLS and token are :mod:`common.schedulerlink`'s, as for the agents.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from common.schedulerlink import Backoff, auth_metadata, open_channel
from common.v1 import agent_pb2 as pb
from common.v1 import agent_pb2_grpc as pb_grpc
from gateway.config import GatewayConfig

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
REPORT_TIMEOUT_S = 10.0
#: A watch stream silent for this many report intervals is dead (the scheduler sends at least
#: one fleet per interval).
SILENT_INTERVALS = 3.0
#: After a new scheduler instance answers, replicas it does not list yet are kept this many
#: report intervals (its fleet is rebuilt from reports within one).
RESTART_GRACE_INTERVALS = 2.0

_STATES = {
    pb.REPLICA_STATE_STARTING: "starting",
    pb.REPLICA_STATE_HEALTHY: "healthy",
    pb.REPLICA_STATE_DRAINING: "draining",
    pb.REPLICA_STATE_CRASH_LOOPING: "crash_looping",
    pb.REPLICA_STATE_FAILED: "failed",
    pb.REPLICA_STATE_STOPPED: "stopped",
}


# -- the fleet, as plain values ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoutableReplica:
    replica_id: str
    deployment: str
    agent_id: str
    host: str
    port: int
    pool: str
    provider: str
    region: str
    residency_group: str
    #: "healthy", "draining", "starting", ... (see ``_STATES``); only healthy takes requests.
    state: str
    running_requests: int = 0
    queued_requests: int = 0
    #: The server's own cap on running requests; 0: unknown.
    max_running_requests: int = 0


def replica_from_pb(r: pb.RoutableReplica) -> RoutableReplica:
    return RoutableReplica(
        replica_id=r.replica_id,
        deployment=r.deployment,
        agent_id=r.agent_id,
        host=r.host,
        port=r.port,
        pool=r.pool,
        provider=r.provider,
        region=r.region,
        residency_group=r.residency_group,
        state=_STATES.get(r.state, "unknown"),
        running_requests=r.running_requests,
        queued_requests=r.queued_requests,
        max_running_requests=r.max_running_requests,
    )


class FleetView:
    """The replicas in force, by id; ``on_change`` is called after every applied fleet."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.replicas: Mapping[str, RoutableReplica] = {}
        self.on_change = on_change
        self.instance = ""
        self.fleets_applied = 0
        self._grace_until = -math.inf

    def apply(
        self,
        replicas: Sequence[RoutableReplica],
        instance: str,
        interval_s: float,
        now: float | None = None,
    ) -> None:
        now = time.monotonic() if now is None else now
        if instance and self.instance and instance != self.instance:
            self._grace_until = now + RESTART_GRACE_INTERVALS * interval_s
            log.info(
                "scheduler restarted (%s -> %s); keeping unlisted replicas for %.1fs",
                self.instance,
                instance,
                RESTART_GRACE_INTERVALS * interval_s,
            )
        self.instance = instance or self.instance
        fresh = {r.replica_id: r for r in replicas}
        if now < self._grace_until:
            fresh = {**self.replicas, **fresh}
        self.replicas = fresh
        self.fleets_applied += 1
        self.on_change()


# -- traffic, as plain values --------------------------------------------------------------------


@dataclass(slots=True)
class TierTotals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class DeploymentTraffic:
    deployment: str
    queue_depth: int
    oldest_queued_s: float
    in_flight: dict[str, int]
    tiers: dict[str, TierTotals]
    overflow_tokens_per_s: float
    refused: int


@dataclass(slots=True)
class LinkState:
    connected: bool = False
    sessions: int = 0
    fleets_received: int = 0
    reports_sent: int = 0
    report_failures: int = 0
    last_error: str | None = None
    interval_s: float = DEFAULT_INTERVAL_S


def _seconds(duration: duration_pb2.Duration) -> float:
    return float(duration.seconds) + duration.nanos / 1e9


def _timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(unix_seconds * 1e9))
    return ts


def build_report(
    gateway_id: str, traffic: Sequence[DeploymentTraffic], now: float | None = None
) -> pb.GatewayReport:
    return pb.GatewayReport(
        gateway_id=gateway_id,
        sent_at=_timestamp(time.time() if now is None else now),
        deployments=[
            pb.DeploymentTraffic(
                deployment=d.deployment,
                queue_depth=d.queue_depth,
                oldest_queued_s=d.oldest_queued_s,
                in_flight=d.in_flight,
                tiers=[
                    pb.TierTraffic(
                        tier=tier,
                        requests=t.requests,
                        input_tokens=t.input_tokens,
                        output_tokens=t.output_tokens,
                    )
                    for tier, t in d.tiers.items()
                ],
                overflow_tokens_per_s=d.overflow_tokens_per_s,
                refused=d.refused,
            )
            for d in traffic
        ],
    )


# -- the link -------------------------------------------------------------------------------------


class SchedulerLink:
    """Keeps one fleet watch (and the reports beside it) alive for as long as :meth:`run` runs."""

    def __init__(
        self,
        config: GatewayConfig,
        token: str,
        fleet: FleetView,
        traffic: Callable[[], Sequence[DeploymentTraffic]],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._metadata = auth_metadata(token)
        self._fleet = fleet
        self._traffic = traffic
        r = config.reconnect
        self._backoff = Backoff(r.initial_backoff_s, r.max_backoff_s, rng or random.Random())
        self.state = LinkState()

    def _delay(self, attempt: int) -> float:
        """Never above the interval once the scheduler has told it (a retry per interval costs
        it what a report does)."""
        r = self._config.reconnect
        return self._backoff.delay(attempt, max(self.state.interval_s, r.initial_backoff_s))

    async def run(self) -> None:
        attempt = 0
        while True:
            received_before = self.state.fleets_received
            try:
                await self._session()
                self.state.last_error = "the scheduler closed the fleet watch"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self.state.last_error = f"{exc.code().name}: {exc.details()}"
            except TimeoutError:
                self.state.last_error = "the fleet watch went silent"
            except Exception as exc:  # a bug or a local problem; keep the gateway routing
                log.exception("fleet watch failed")
                self.state.last_error = repr(exc)
            self.state.connected = False
            if self.state.fleets_received > received_before:
                attempt = 0
            delay = self._delay(attempt)
            attempt += 1
            log.warning(
                "lost the scheduler at %s (%s); routing with the last fleet (%d replicas), "
                "retrying in %.2fs",
                self._config.scheduler.address,
                self.state.last_error,
                len(self._fleet.replicas),
                delay,
            )
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        endpoint = self._config.scheduler
        channel = open_channel(endpoint.address, endpoint.tls)
        reporter: asyncio.Task[None] | None = None
        try:
            stub = pb_grpc.GatewayServiceStub(channel)
            self.state.sessions += 1
            call = stub.WatchFleet(
                pb.WatchFleetRequest(gateway_id=self._config.gateway_id), metadata=self._metadata
            )
            iterator = call.__aiter__()
            while True:
                silent_s = SILENT_INTERVALS * self.state.interval_s + 1.0
                try:
                    async with asyncio.timeout(silent_s):
                        message = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                self._apply(message)
                if reporter is None:  # reports start once the scheduler gave its interval
                    reporter = asyncio.create_task(self._report_forever(stub))
        finally:
            if reporter is not None:
                reporter.cancel()
            await channel.close(grace=None)

    def _apply(self, message: pb.RoutableFleet) -> None:
        interval = _seconds(message.report_interval)
        if interval > 0:
            self.state.interval_s = interval
        if not self.state.connected:
            log.info(
                "watching the fleet of scheduler %s at %s (%d replicas)",
                message.scheduler_instance or "?",
                self._config.scheduler.address,
                len(message.replicas),
            )
        self.state.connected = True
        self.state.fleets_received += 1
        replicas = [replica_from_pb(r) for r in message.replicas]
        self._fleet.apply(replicas, message.scheduler_instance, self.state.interval_s)

    async def _report_forever(self, stub: pb_grpc.GatewayServiceAsyncStub) -> None:
        while True:
            await asyncio.sleep(self.state.interval_s)
            report = build_report(self._config.gateway_id, self._traffic())
            try:
                ack = await stub.ReportTraffic(
                    report, metadata=self._metadata, timeout=REPORT_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                # The watch notices a dead scheduler; a refused report alone is only logged.
                self.state.report_failures += 1
                log.warning("traffic report refused: %s: %s", exc.code().name, exc.details())
                continue
            self.state.reports_sent += 1
            interval = _seconds(ack.report_interval)
            if interval > 0:
                self.state.interval_s = interval
