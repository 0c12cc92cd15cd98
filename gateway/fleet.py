"""The gateway's link to the scheduler: the fleet watch, and the traffic reports sent back.

``GatewayService.WatchFleet`` streams the routable fleet as a whole set; :class:`FleetView`
keeps the newest one as plain values. ``ReportTraffic`` carries what the gateway saw, once per
report interval (the interval is the scheduler's, from its answers). The gateway only dials out.

Fail static: when the stream breaks (scheduler restart, network loss, refused token) the last
fleet stays in force and the link reconnects after a jittered exponential backoff; a restarted
scheduler knows no replica until the agents report again, so for two report intervals after a
new scheduler instance answers, replicas it does not list yet are kept. Protobuf messages are
built and read here and nowhere else in the gateway.

Several schedulers (``scheduler.addresses``, active-active): traffic goes to every one of them,
each on its own channel and schedule, because any of them may run the plan that reads it; the
fleet comes from one at a time, since every scheduler sees every agent. When the watch breaks,
the link moves to the next scheduler in the list at once, and backs off only after a whole
round failed; once a watch works it stays on it, and a scheduler that comes back does not win
the watch back (no flapping). The restart grace above covers the switch too. One thing is not
in every scheduler's fleet: a drain through the gateways marks the replica DRAINING only in the
scheduler whose worker runs it. So the link also keeps a watch on each other scheduler, only
for those marks, and a replica any of them shows DRAINING is draining here too.

The channel, TLS and token are :mod:`common.schedulerlink`'s, as for the agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

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
    #: The scheduler whose fleet is watched (or was, when not connected).
    watching: str = ""
    #: How often the watch moved to another scheduler.
    failovers: int = 0
    #: Traffic reports each scheduler accepted, by address.
    reports_by_address: dict[str, int] = field(default_factory=dict)


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
    """Keeps one fleet watch alive, and traffic reports going to every scheduler, for as long
    as :meth:`run` runs (see the module docstring)."""

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
        self._addresses = config.scheduler.address_list
        r = config.reconnect
        self._backoff = Backoff(r.initial_backoff_s, r.max_backoff_s, rng or random.Random())
        self.state = LinkState(watching=self._addresses[0])
        #: Set once some scheduler has said its report interval.
        self._told_interval = asyncio.Event()
        #: The newest fleet of the watched scheduler, as it came.
        self._primary: tuple[list[RoutableReplica], str] = ([], "")
        #: Per other scheduler: the replicas it shows DRAINING (a drain it runs).
        self._marks: dict[str, frozenset[str]] = {}

    def _delay(self, attempt: int) -> float:
        """Never above the interval once the scheduler has told it (a retry per interval costs
        it what a report does)."""
        r = self._config.reconnect
        return self._backoff.delay(attempt, max(self.state.interval_s, r.initial_backoff_s))

    async def run(self) -> None:
        reports = [
            asyncio.create_task(self._report_forever(address), name=f"traffic to {address}")
            for address in self._addresses
        ]
        if len(self._addresses) > 1:
            reports += [
                asyncio.create_task(self._marks_forever(address), name=f"drains at {address}")
                for address in self._addresses
            ]
        try:
            await self._watch_forever()
        finally:
            for task in reports:
                task.cancel()
            await asyncio.gather(*reports, return_exceptions=True)

    async def _watch_forever(self) -> None:
        attempt = 0  # rounds of the whole list that failed
        index = 0
        failed_in_round = 0
        while True:
            address = self._addresses[index]
            self.state.watching = address
            received_before = self.state.fleets_received
            try:
                await self._session(address)
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
                failed_in_round = 0
            failed_in_round += 1
            if len(self._addresses) > 1:
                index = (index + 1) % len(self._addresses)
                self.state.failovers += 1
                if failed_in_round < len(self._addresses):
                    # Another scheduler has the whole fleet too: try it at once.
                    log.warning(
                        "lost the fleet watch at %s (%s); routing with the last fleet (%d "
                        "replicas), watching %s instead",
                        address,
                        self.state.last_error,
                        len(self._fleet.replicas),
                        self._addresses[index],
                    )
                    continue
                failed_in_round = 0
            delay = self._delay(attempt)
            attempt += 1
            log.warning(
                "lost the scheduler at %s (%s); routing with the last fleet (%d replicas), "
                "retrying in %.2fs",
                ", ".join(self._addresses),
                self.state.last_error,
                len(self._fleet.replicas),
                delay,
            )
            await asyncio.sleep(delay)

    async def _session(self, address: str) -> None:
        channel = open_channel(address, self._config.scheduler.tls)
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
                self._apply(message, address)
        finally:
            await channel.close(grace=None)

    def _apply(self, message: pb.RoutableFleet, address: str) -> None:
        interval = _seconds(message.report_interval)
        if interval > 0:
            self.state.interval_s = interval
            self._told_interval.set()
        if not self.state.connected:
            log.info(
                "watching the fleet of scheduler %s at %s (%d replicas)",
                message.scheduler_instance or "?",
                address,
                len(message.replicas),
            )
        self.state.connected = True
        self.state.fleets_received += 1
        self._primary = ([replica_from_pb(r) for r in message.replicas], message.scheduler_instance)
        self._apply_merged()

    def _apply_merged(self) -> None:
        """The watched fleet, with every replica another scheduler drains shown draining."""
        replicas, instance = self._primary
        marked = frozenset().union(*self._marks.values()) if self._marks else frozenset()
        if marked:
            replicas = [
                dataclasses.replace(r, state="draining")
                if r.replica_id in marked and r.state in ("healthy", "starting")
                else r
                for r in replicas
            ]
        self._fleet.apply(replicas, instance, self.state.interval_s)

    def _set_marks(self, address: str, marks: frozenset[str]) -> None:
        if self._marks.get(address, frozenset()) == marks:
            return
        self._marks[address] = marks
        if self.state.fleets_received:
            self._apply_merged()

    async def _marks_forever(self, address: str) -> None:
        """Drain marks from ``address`` whenever it is not the watched scheduler."""
        attempt = 0
        while True:
            if self.state.watching == address:
                self._set_marks(address, frozenset())
                await asyncio.sleep(min(0.25, self.state.interval_s))
                continue
            try:
                await self._marks_session(address)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, TimeoutError):
                pass
            except Exception:  # a bug or a local problem; the fleet watch goes on regardless
                log.exception("drain watch at %s failed", address)
            self._set_marks(address, frozenset())
            if self.state.watching != address:
                await asyncio.sleep(self._delay(attempt))
                attempt += 1

    async def _marks_session(self, address: str) -> None:
        channel = open_channel(address, self._config.scheduler.tls)
        try:
            call = pb_grpc.GatewayServiceStub(channel).WatchFleet(
                pb.WatchFleetRequest(gateway_id=self._config.gateway_id), metadata=self._metadata
            )
            iterator = call.__aiter__()
            while self.state.watching != address:
                silent_s = SILENT_INTERVALS * self.state.interval_s + 1.0
                try:
                    async with asyncio.timeout(silent_s):
                        message = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                self._set_marks(
                    address,
                    frozenset(
                        r.replica_id
                        for r in message.replicas
                        if r.state == pb.REPLICA_STATE_DRAINING
                    ),
                )
        finally:
            await channel.close(grace=None)

    async def _report_forever(self, address: str) -> None:
        """Traffic to one scheduler, once per interval, on a channel of its own: a slow or dead
        scheduler delays only its own reports."""
        channel = open_channel(address, self._config.scheduler.tls)
        failing = False
        try:
            stub = pb_grpc.GatewayServiceStub(channel)
            # Reports start once a scheduler gave its interval (or after the default one).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._told_interval.wait(), self.state.interval_s)
            while True:
                await asyncio.sleep(self.state.interval_s)
                report = build_report(self._config.gateway_id, self._traffic())
                try:
                    ack = await stub.ReportTraffic(
                        report, metadata=self._metadata, timeout=REPORT_TIMEOUT_S
                    )
                except grpc.aio.AioRpcError as exc:
                    # The watch notices a dead scheduler; a refused report alone is only logged
                    # (once per run of failures).
                    self.state.report_failures += 1
                    if not failing:
                        log.warning(
                            "traffic report to %s refused: %s: %s",
                            address,
                            exc.code().name,
                            exc.details(),
                        )
                    failing = True
                    continue
                failing = False
                self.state.reports_sent += 1
                by_address = self.state.reports_by_address
                by_address[address] = by_address.get(address, 0) + 1
                interval = _seconds(ack.report_interval)
                if interval > 0:
                    self.state.interval_s = interval
                    self._told_interval.set()
        finally:
            await channel.close(grace=None)
