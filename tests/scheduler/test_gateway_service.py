"""GatewayService over real loopback gRPC: roles, the fleet watch, traffic reports, signals."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest

from agent.gpus import StaticInventory
from agent.reporter import Reporter
from agent.status import ReplicaState, ReplicaStatus
from common.schedulerlink import auth_metadata
from common.v1 import agent_pb2 as pb
from common.v1 import agent_pb2_grpc as pb_grpc
from decisions.autoscale import signal
from decisions.policy import Deployment
from scheduler.server import Scheduler
from scheduler.snapshot import snapshot_from_fleet
from spillway.status import fetch_fleet, fleet_json, gateway_figures, render
from tests.conftest import SchedulerFactory, Tokens, agent_config, eventually
from tests.scheduler.test_server import REPLICA, _register, _stream, full_report, registration

ROOT = Path(__file__).resolve().parents[2]
CAPPED = replace(REPLICA, load=replace(REPLICA.load, max_running_requests=48))


@pytest.fixture
def gw_tokens(tokens: Tokens) -> Tokens:
    tokens.add("gw-1", "gateway")
    tokens.add("gw-2", "gateway")
    return tokens


@contextlib.asynccontextmanager
async def reporting(
    scheduler: Scheduler,
    tokens: Tokens,
    tmp_path: Path,
    agent_id: str,
    replicas: Callable[[], Sequence[ReplicaStatus]],
    advertise_host: str = "",
) -> AsyncIterator[Reporter]:
    """A real reporter whose replicas are whatever ``replicas()`` returns at each report."""
    config = agent_config(
        agent_id,
        f"127.0.0.1:{scheduler.port}",
        tokens.write(agent_id, tmp_path),
        advertise_host=advertise_host,
    )
    reporter = Reporter(
        config,
        StaticInventory.from_config(config.gpus, agent_id),
        tokens.clear[agent_id],
        replicas,
        version="test",
        hostname="test-host",
        rng=random.Random(1),
    )
    task = asyncio.create_task(reporter.run())
    try:
        yield reporter
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Watch:
    """A WatchFleet stream read in the background; every message with its arrival time."""

    def __init__(self, port: int, token: str, gateway_id: str = "") -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GatewayServiceStub(self.channel)
        self.call = stub.WatchFleet(
            pb.WatchFleetRequest(gateway_id=gateway_id), metadata=auth_metadata(token)
        )
        self.messages: list[tuple[float, pb.RoutableFleet]] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.call:
            self.messages.append((time.monotonic(), message))

    @property
    def latest(self) -> pb.RoutableFleet | None:
        return self.messages[-1][1] if self.messages else None

    def replicas(self) -> dict[str, pb.RoutableReplica]:
        latest = self.latest
        return {r.replica_id: r for r in latest.replicas} if latest is not None else {}

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._task
        await self.channel.close(None)


@contextlib.asynccontextmanager
async def watching(port: int, token: str, gateway_id: str = "") -> AsyncIterator[Watch]:
    watch = Watch(port, token, gateway_id)
    try:
        yield watch
    finally:
        await watch.close()


async def report_traffic(port: int, token: str, report: pb.GatewayReport) -> pb.GatewayReportAck:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        ack: pb.GatewayReportAck = await stub.ReportTraffic(
            report, metadata=auth_metadata(token), timeout=5
        )
        return ack


def traffic(
    gateway_id: str,
    deployment: str = "llama-70b",
    *,
    queue: int = 0,
    oldest: float = 0.0,
    overflow: float = 0.0,
    in_flight: dict[str, int] | None = None,
) -> pb.GatewayReport:
    report = pb.GatewayReport(gateway_id=gateway_id)
    report.sent_at.GetCurrentTime()
    report.deployments.add(
        deployment=deployment,
        queue_depth=queue,
        oldest_queued_s=oldest,
        in_flight=in_flight or {},
        overflow_tokens_per_s=overflow,
        tiers=[pb.TierTraffic(tier="reserved", requests=10, input_tokens=100, output_tokens=50)],
    )
    return report


# -- roles --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("spw_not-a-real-token", grpc.StatusCode.UNAUTHENTICATED),
        ("node-a", grpc.StatusCode.PERMISSION_DENIED),  # an agent is no gateway
        ("oncall", grpc.StatusCode.PERMISSION_DENIED),  # nor is an operator
        ("gw-2", grpc.StatusCode.PERMISSION_DENIED),  # gw-2's token cannot speak as gw-1
    ],
)
async def test_gateway_calls_need_the_gateways_own_token(
    start_scheduler: SchedulerFactory, gw_tokens: Tokens, who: str | None, code: grpc.StatusCode
) -> None:
    scheduler = await start_scheduler()
    token = gw_tokens.clear.get(who, who) if who else None
    metadata = auth_metadata(token) if token else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}") as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportTraffic(traffic("gw-1"), metadata=metadata, timeout=5)
        assert caught.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            call = stub.WatchFleet(
                pb.WatchFleetRequest(gateway_id="gw-1"), metadata=metadata, timeout=5
            )
            await call.read()
        assert caught.value.code() == code
    assert scheduler.fleet.gateways() == []
    assert scheduler.service.rejected[code.name] == 2


async def test_a_gateway_token_is_refused_by_the_agent_and_fleet_services(
    start_scheduler: SchedulerFactory, gw_tokens: Tokens
) -> None:
    scheduler = await start_scheduler()
    gateway = gw_tokens.clear["gw-1"]
    tokens_file = gw_tokens.path.read_text()
    assert "role: gateway" in tokens_file and gateway not in tokens_file
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _register(scheduler.port, registration("gw-1"), gateway)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "role 'gateway'" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stream(scheduler.port, gateway, [full_report("gw-1", 1)])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch_fleet(f"127.0.0.1:{scheduler.port}", gateway, None)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert scheduler.fleet.get("gw-1") is None


# -- the fleet watch ----------------------------------------------------------------------------


async def test_watch_sends_the_fleet_at_once_then_changes_within_an_interval(
    start_scheduler: SchedulerFactory, gw_tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler(report_interval_s=0.5, stale_after_intervals=2)
    interval = 0.5
    b_replicas: list[ReplicaStatus] = []
    async with (
        reporting(scheduler, gw_tokens, tmp_path, "node-a", lambda: (CAPPED,), "10.0.0.7"),
        reporting(scheduler, gw_tokens, tmp_path, "node-b", lambda: tuple(b_replicas)),
    ):
        await eventually(lambda: all(scheduler.fleet.get(a) for a in ("node-a", "node-b")))
        await eventually(lambda: scheduler.fleet.get("node-a").report is not None)  # type: ignore[union-attr]
        async with watching(scheduler.port, gw_tokens.clear["gw-1"], "gw-1") as watch:
            took = await eventually(lambda: watch.messages, within_s=2)
            assert took < interval / 2, "the first message comes when the stream opens"
            first = watch.latest
            assert first is not None
            assert first.scheduler_instance == scheduler.instance
            assert first.report_interval.ToNanoseconds() == 500_000_000
            (replica,) = first.replicas
            assert (replica.replica_id, replica.deployment, replica.agent_id) == (
                "llama-70b-0",
                "llama-70b",
                "node-a",
            )
            assert (replica.host, replica.port) == ("10.0.0.7", 30000)
            assert (replica.pool, replica.provider, replica.region, replica.residency_group) == (
                "reserved-eu",
                "onprem",
                "eu-frankfurt",
                "eu",
            )
            assert replica.state == pb.REPLICA_STATE_HEALTHY
            assert (replica.running_requests, replica.queued_requests) == (12, 3)
            assert replica.max_running_requests == 48

            # A new healthy replica on node-b (no advertise_host: its hostname) shows up
            # within one report interval of appearing.
            appeared = time.monotonic()
            b_replicas.append(replace(REPLICA, replica_id="llama-70b-1", port=30001))
            await eventually(lambda: "llama-70b-1" in watch.replicas(), within_s=interval * 2)
            assert time.monotonic() - appeared < interval + 0.25
            assert watch.replicas()["llama-70b-1"].host == "test-host"

            # A state change is sent as soon as the report carrying it arrives.
            b_replicas[0] = replace(b_replicas[0], state=ReplicaState.DRAINING)
            await eventually(
                lambda: watch.replicas()["llama-70b-1"].state == pb.REPLICA_STATE_DRAINING,
                within_s=interval * 2,
            )
        # node-b stops reporting: once stale (2 intervals) its replica leaves at once.
    async with (
        reporting(scheduler, gw_tokens, tmp_path, "node-a", lambda: (CAPPED,), "10.0.0.7"),
        watching(scheduler.port, gw_tokens.clear["gw-1"]) as watch,
    ):
        await eventually(lambda: "llama-70b-1" in watch.replicas(), within_s=2)
        # Only node-a reports from here on.
        await eventually(lambda: "llama-70b-1" not in watch.replicas(), within_s=interval * 5)
        gone_at = watch.messages[-1][0]
        record = scheduler.fleet.get("node-b")
        assert record is not None
        silent = gone_at - record.last_seen
        assert silent < scheduler.fleet.stale_after_s + interval, silent
        assert set(watch.replicas()) == {"llama-70b-0"}


async def test_a_failed_agents_replicas_leave_promptly(
    start_scheduler: SchedulerFactory, gw_tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler(report_interval_s=0.2, stale_after_intervals=3)
    async with watching(scheduler.port, gw_tokens.clear["gw-1"]) as watch:
        async with reporting(scheduler, gw_tokens, tmp_path, "node-a", lambda: (REPLICA,)):
            await eventually(lambda: "llama-70b-0" in watch.replicas(), within_s=2)
        stopped = time.monotonic()  # the agent died: no more reports
        await eventually(lambda: not watch.replicas(), within_s=3)
        took = time.monotonic() - stopped
        assert took < scheduler.fleet.stale_after_s + 0.3, took


async def test_a_quiet_fleet_gets_a_heartbeat_per_interval_and_no_more(
    start_scheduler: SchedulerFactory, gw_tokens: Tokens
) -> None:
    scheduler = await start_scheduler(
        report_interval_s=0.3, stale_after_intervals=20, gone_after_intervals=40
    )
    port = scheduler.port
    await _register(port, registration("node-a"), gw_tokens.clear["node-a"])

    async def reports() -> AsyncIterator[pb.CapacityReport]:
        for n in range(1, 16):
            yield full_report("node-a", n, [REPLICA])
            await asyncio.sleep(0.04)  # longer than a watch takes to coalesce changes

    async with watching(port, gw_tokens.clear["gw-1"]) as watch:
        await eventually(lambda: watch.messages, within_s=2)
        await asyncio.sleep(0.05)
        before, version = len(watch.messages), scheduler.fleet.routable_version
        # Fifteen reports of the same replica: one change (it appeared), not fifteen messages.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.AgentServiceStub(channel).Report(
                reports(), metadata=auth_metadata(gw_tokens.clear["node-a"]), timeout=5
            )
            assert [ack.sequence async for ack in call] == [1, 11]
        assert scheduler.fleet.routable_version == version + 1
        assert watch.replicas()
        # The change and the heartbeats of those 0.6 s (one per 0.3 s): not one per report.
        assert len(watch.messages) - before <= 4
        # Then nothing changes: one message per interval (the heartbeat).
        await asyncio.sleep(0.1)
        start = len(watch.messages)
        await asyncio.sleep(0.3 * 5)
        beats = len(watch.messages) - start
        assert 4 <= beats <= 6, beats
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(watch.messages[start:])]
        assert all(g < 0.3 + 0.15 for g in gaps), gaps


async def test_marked_draining_shows_at_once(
    start_scheduler: SchedulerFactory, gw_tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler(report_interval_s=1.0)
    async with (
        reporting(scheduler, gw_tokens, tmp_path, "node-a", lambda: (REPLICA,)),
        watching(scheduler.port, gw_tokens.clear["gw-1"]) as watch,
    ):
        await eventually(lambda: "llama-70b-0" in watch.replicas(), within_s=3)
        await asyncio.sleep(0.05)
        assert scheduler.fleet.mark_draining("llama-70b-0")
        assert not scheduler.fleet.mark_draining("no-such-replica")
        took = await eventually(
            lambda: watch.replicas()["llama-70b-0"].state == pb.REPLICA_STATE_DRAINING,
            within_s=1,
        )
        assert took < 0.2, "sent at once, not at the next heartbeat"
        snapshot = snapshot_from_fleet(
            scheduler.fleet.agents(), draining=scheduler.fleet.draining()
        )
        assert [r.state.value for r in snapshot.replicas] == ["draining"]


# -- traffic reports ----------------------------------------------------------------------------


def _bad_traffic() -> list[tuple[str, pb.GatewayReport]]:
    negative = traffic("gw-1", oldest=-1.0)
    nan = traffic("gw-1", overflow=math.nan)
    inf = traffic("gw-1", overflow=math.inf)
    tier = traffic("gw-1")
    tier.deployments[0].tiers.add(tier="spot")
    twice = traffic("gw-1")
    twice.deployments.add(deployment="llama-70b")
    nameless = traffic("gw-1", deployment="")
    many = traffic("gw-1")
    for n in range(300):
        many.deployments.add(deployment=f"d{n}")
    return [
        ("deployments[0].oldest_queued_s must be a finite number >= 0, got -1.0", negative),
        ("deployments[0].overflow_tokens_per_s must be a finite number >= 0, got nan", nan),
        ("deployments[0].overflow_tokens_per_s must be a finite number >= 0, got inf", inf),
        ("deployments[0].tiers[1].tier must be one of reserved, rented, managed", tier),
        ("deployments[1].deployment 'llama-70b' is listed twice", twice),
        ("deployments[0].deployment is required", nameless),
        ("more than 256 deployments", many),
    ]


async def test_bad_traffic_reports_get_invalid_argument_naming_the_field(
    start_scheduler: SchedulerFactory, gw_tokens: Tokens
) -> None:
    scheduler = await start_scheduler(max_message_bytes=16 * 1024)
    token = gw_tokens.clear["gw-1"]
    for expected, report in _bad_traffic():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await report_traffic(scheduler.port, token, report)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in (caught.value.details() or "")
    oversized = traffic("gw-1", in_flight={f"replica-{n:05d}-{'x' * 40}": 1 for n in range(400)})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await report_traffic(scheduler.port, token, oversized)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the limit of 16384" in (caught.value.details() or "")
    assert scheduler.fleet.gateways() == []
    # A good one is kept, and answered with the report interval.
    ack = await report_traffic(scheduler.port, token, traffic("", queue=2))
    assert ack.report_interval.ToNanoseconds() == 200_000_000
    (record,) = scheduler.fleet.gateways()
    assert record.gateway_id == "gw-1"  # an empty id is the token's own


async def test_traffic_becomes_signals_in_the_snapshot_and_status(
    start_scheduler: SchedulerFactory, gw_tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler(
        report_interval_s=0.2,
        stale_after_intervals=3,
        gone_after_intervals=6,
        metrics_listen="127.0.0.1:0",
    )
    port = scheduler.port
    fleet = scheduler.fleet
    async with reporting(scheduler, gw_tokens, tmp_path, "node-a", lambda: (REPLICA,)):
        await eventually(lambda: (r := fleet.get("node-a")) is not None and r.report)
        r1 = traffic("gw-1", queue=5, oldest=2.5, overflow=120.0, in_flight={"llama-70b-0": 3})
        r2 = traffic("gw-2", queue=2, oldest=4.0, overflow=30.0, in_flight={"llama-70b-0": 1})
        r2.deployments[0].in_flight["managed-eu"] = 4
        await report_traffic(port, gw_tokens.clear["gw-1"], r1)
        await report_traffic(port, gw_tokens.clear["gw-2"], r2)
        # The newest report per gateway is what counts.
        r1.deployments[0].queue_depth = 6

        async def gateways_report() -> None:  # as gateways do, while the test looks
            while True:
                await report_traffic(port, gw_tokens.clear["gw-1"], r1)
                await report_traffic(port, gw_tokens.clear["gw-2"], r2)
                await asyncio.sleep(0.1)

        reporter = asyncio.create_task(gateways_report())
        await eventually(lambda: fleet.gateways()[0].report.deployments[0].queue_depth == 6)

        snapshot = snapshot_from_fleet(
            fleet.agents(), gateways=fleet.gateways(within_s=fleet.stale_after_s)
        )
        load = snapshot.gateway["llama-70b"]
        assert (load.queue_depth, load.oldest_queued_s, load.gateways) == (8, 4.0, 2)
        assert load.overflow_tokens_per_s == pytest.approx(150.0)
        assert dict(load.in_flight) == {"llama-70b-0": 4, "managed-eu": 4}
        dep = _deployment("queued_at_gateway")
        assert signal("llama-70b", dep, snapshot) == 8.0
        assert signal("llama-70b", _deployment("overflow_tokens_per_s"), snapshot) == 150.0
        assert signal("other", dep, snapshot) == 0.0

        # `spillway status --json`, as a real process.
        operator = gw_tokens.write("oncall", tmp_path)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spillway",
            "status",
            "--scheduler",
            f"127.0.0.1:{port}",
            "--token-file",
            str(operator),
            "--json",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        assert process.returncode == 0
        data = json.loads(out)
        assert {g["last_report"]["gateway_id"] for g in data["gateways"]} == {"gw-1", "gw-2"}
        assert data["deployments"]["llama-70b"]["gateway"] == {
            "gateways": 2,
            "queue_depth": 8,
            "oldest_queued_s": 4.0,
            "in_flight": 8,
            "overflow_tokens_per_s": 150.0,
        }

        async with (
            watching(port, gw_tokens.clear["gw-1"]) as watch,
            httpx.AsyncClient() as http,
        ):
            await eventually(lambda: watch.messages)
            metrics = await http.get(f"http://127.0.0.1:{scheduler.metrics_port}/metrics")
        lines = metrics.text.splitlines()
        assert 'spillway_gateways{health="connected"} 2.0' in lines
        assert "spillway_fleet_watches_open 1.0" in lines

        # The table shows the same figures beside the replicas.
        response = await fetch_fleet(f"127.0.0.1:{port}", gw_tokens.clear["oncall"], None)
        assert gateway_figures(response)["llama-70b"] == data["deployments"]["llama-70b"]["gateway"]
        assert fleet_json(response)["deployments"] == data["deployments"]
        from rich.console import Console

        console = Console(width=200, record=True)
        console.print(render(response))
        text = console.export_text()
        assert "At the gateways" in text
        row = next(line for line in text.splitlines() if line.startswith("│ llama-70b "))
        for figure in ("1/1 healthy", "8", "4.0s", "150"):
            assert figure in row, row

        # A gateway that stops reporting stops counting once stale, and is then forgotten.
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        await eventually(lambda: not fleet.gateways(within_s=fleet.stale_after_s), within_s=2)
        response = await fetch_fleet(f"127.0.0.1:{port}", gw_tokens.clear["oncall"], None)
        assert list(response.gateways) == []
        await eventually(lambda: not fleet.gateways(), within_s=3)


def _deployment(kind: str) -> Deployment:
    return Deployment.model_validate(
        {
            "model": "m",
            "weights": "s3://b/m",
            "sku": "H100-80GB",
            "gpus": 8,
            "pools": ["reserved-eu"],
            "max_replicas": 4,
            "autoscaling": {"signal": kind, "target": 4},
        }
    )
