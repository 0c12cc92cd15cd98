"""The scheduler's gRPC API over real loopback connections, driven by real reporters."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.gpus import GpuSample, StaticInventory
from agent.reporter import Reporter, build_registration, build_report
from agent.status import ReplicaLoad, ReplicaState, ReplicaStatus
from common.schedulerlink import auth_metadata
from common.v1 import agent_pb2 as pb
from common.v1 import agent_pb2_grpc as pb_grpc
from scheduler.fleet import AgentHealth
from scheduler.server import Scheduler
from spillway.status import fetch_fleet
from tests.conftest import SchedulerFactory, Tokens, agent_config, eventually

REPLICA = ReplicaStatus(
    replica_id="llama-70b-0",
    deployment="llama-70b",
    model="meta-llama/Llama-3.1-70B-Instruct",
    runtime="simulated",
    port=30000,
    gpu_indices=(0, 1, 2, 3),
    state=ReplicaState.HEALTHY,
    load=ReplicaLoad(
        running_requests=12,
        queued_requests=3,
        kv_cache_usage=0.41,
        generation_tokens_per_second=1830.0,
        cache_hit_rate=0.25,
    ),
    restarts=1,
    started_at=1_700_000_000.5,
)


@contextlib.asynccontextmanager
async def reporting(
    scheduler: Scheduler,
    tokens: Tokens,
    tmp_path: Path,
    agent_id: str,
    replicas: tuple[ReplicaStatus, ...] = (),
    gpus: int = 8,
) -> AsyncIterator[Reporter]:
    """Run a real reporter against ``scheduler`` for the duration of the block."""
    config = agent_config(
        agent_id, f"127.0.0.1:{scheduler.port}", tokens.write(agent_id, tmp_path), gpus=gpus
    )
    inventory = StaticInventory.from_config(config.gpus, agent_id)
    reporter = Reporter(
        config,
        inventory,
        tokens.clear[agent_id],
        lambda: replicas,
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


def full_report(
    agent_id: str, sequence: int, replicas: list[ReplicaStatus] | None = None, gpus: int = 8
) -> pb.CapacityReport:
    """A report as an agent sends it: every registered GPU, idle and healthy."""
    samples = [GpuSample(i, 0, 0.0, True) for i in range(gpus)]
    return build_report(agent_id, sequence, samples, replicas or [])


def registration(agent_id: str, gpus: int = 8) -> pb.RegisterRequest:
    config = agent_config(agent_id, "127.0.0.1:1", Path("unused"), gpus=gpus)
    inventory = StaticInventory.from_config(config.gpus, agent_id)
    return build_registration(config, inventory.gpus, "static", "test", "host")


async def test_two_agents_converge_and_status_shows_them(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler()
    async with (
        reporting(scheduler, tokens, tmp_path, "node-a", replicas=(REPLICA,)),
        reporting(scheduler, tokens, tmp_path, "node-b", gpus=4),
    ):
        fleet = scheduler.fleet
        took = await eventually(
            lambda: all((r := fleet.get(a)) is not None and r.report for a in ("node-a", "node-b"))
        )
        assert took < scheduler.config.report_interval_s * 2
        pools = fleet.pools()
        assert [(p.pool, p.agents, p.gpus_free, p.gpus_total) for p in pools] == [
            ("reserved-eu", 2, 4 + 4, 8 + 4)  # node-a's replica holds 4 of its 8 GPUs
        ]

        response = await fetch_fleet(f"127.0.0.1:{scheduler.port}", tokens.clear["oncall"], None)
        by_id = {a.registration.agent_id: a for a in response.agents}
        assert set(by_id) == {"node-a", "node-b"}
        a = by_id["node-a"]
        assert a.health == pb.AGENT_HEALTH_CONNECTED
        assert a.registration.labels.residency_group == "eu"
        assert a.registration.task_queue == "agent-node-a"
        assert [g.model for g in a.registration.gpus] == ["NVIDIA H100 80GB HBM3"] * 8
        assert a.registration.gpus[0].memory_total_bytes == 80 * 1024**3
        (replica,) = a.last_report.replicas
        assert replica.state == pb.REPLICA_STATE_HEALTHY
        assert replica.load.running_requests == 12
        assert replica.load.queued_requests == 3
        assert math.isclose(replica.load.kv_cache_usage, 0.41)
        assert math.isclose(replica.started_at.ToNanoseconds() / 1e9, 1_700_000_000.5)
        held = [g.index for g in a.last_report.gpus if g.replica_id == "llama-70b-0"]
        assert held == [0, 1, 2, 3]
        assert response.scheduler_instance == scheduler.instance
        assert response.report_interval.ToNanoseconds() == 200_000_000

        # Reports keep flowing at the scheduler's interval.
        before = fleet.get("node-b").reports_received  # type: ignore[union-attr]
        await asyncio.sleep(scheduler.config.report_interval_s * 3)
        assert fleet.get("node-b").reports_received >= before + 2  # type: ignore[union-attr]


async def test_agents_reregister_after_scheduler_restart(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    first = await start_scheduler(report_interval_s=0.5)
    port = first.port
    async with (
        reporting(first, tokens, tmp_path, "node-a") as a,
        reporting(first, tokens, tmp_path, "node-b") as b,
    ):
        await eventually(lambda: len(first.fleet.agents()) == 2)
        await first.stop(grace=0)
        await asyncio.sleep(1.0)  # the scheduler is down for two intervals
        second = await start_scheduler(listen=f"127.0.0.1:{port}", report_interval_s=0.5)
        assert second.instance != first.instance
        took = await eventually(
            lambda: sum(1 for r, _ in second.fleet.agents() if r.report is not None) == 2
        )
        assert took < 2 * 0.5, f"fleet rebuilt in {took:.2f}s, more than two intervals"
        assert a.scheduler_instance == b.scheduler_instance == second.instance
        assert a.registrations >= 2 and b.registrations >= 2


async def test_stale_then_gone(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler(
        report_interval_s=0.1, stale_after_intervals=3, gone_after_intervals=8
    )
    fleet = scheduler.fleet
    async with reporting(scheduler, tokens, tmp_path, "node-a"):
        await eventually(lambda: fleet.get("node-a") is not None)
        async with reporting(scheduler, tokens, tmp_path, "node-b"):
            await eventually(lambda: fleet.get("node-b") is not None)
        # node-b stopped reporting; node-a carries on.
        record = fleet.get("node-b")
        assert record is not None
        assert fleet.health(record) is AgentHealth.CONNECTED
        await eventually(lambda: fleet.health(record) is AgentHealth.STALE, within_s=2)
        assert [p.agents for p in fleet.pools()] == [1]  # stale agents are not capacity
        await eventually(lambda: fleet.get("node-b") is None, within_s=3)
        node_a = fleet.get("node-a")
        assert node_a is not None and fleet.health(node_a) is AgentHealth.CONNECTED


async def _register(
    port: int, request: pb.RegisterRequest, token: str | None
) -> pb.RegisterResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        metadata = auth_metadata(token) if token is not None else None
        response: pb.RegisterResponse = await stub.Register(request, metadata=metadata, timeout=5)
        return response


async def _stream(port: int, token: str, reports: list[pb.CapacityReport]) -> list[pb.ReportAck]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        call = stub.Report(iter(reports), metadata=auth_metadata(token), timeout=5)
        return [ack async for ack in call]


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("spw_not-a-real-token", grpc.StatusCode.UNAUTHENTICATED),
        ("oncall", grpc.StatusCode.PERMISSION_DENIED),  # an operator cannot register
        ("node-b", grpc.StatusCode.PERMISSION_DENIED),  # node-b's token cannot act as node-a
    ],
)
async def test_register_is_refused_without_the_agents_own_token(
    start_scheduler: SchedulerFactory, tokens: Tokens, token: str | None, code: grpc.StatusCode
) -> None:
    scheduler = await start_scheduler()
    clear = tokens.clear.get(token, token) if token else None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _register(scheduler.port, registration("node-a"), clear)
    assert caught.value.code() == code
    assert scheduler.fleet.get("node-a") is None
    assert scheduler.service.rejected[code.name] == 1


async def test_agent_cannot_report_as_another_id(
    start_scheduler: SchedulerFactory, tokens: Tokens
) -> None:
    scheduler = await start_scheduler()
    await _register(scheduler.port, registration("node-a"), tokens.clear["node-a"])
    await _register(scheduler.port, registration("node-b"), tokens.clear["node-b"])
    forged = full_report("node-a", 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stream(scheduler.port, tokens.clear["node-b"], [forged])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "bound to agent 'node-b'" in (caught.value.details() or "")
    assert scheduler.fleet.get("node-a").report is None  # type: ignore[union-attr]


async def test_report_stream_needs_a_token_and_a_registration(
    start_scheduler: SchedulerFactory, tokens: Tokens
) -> None:
    scheduler = await start_scheduler()
    report = full_report("node-a", 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stream(scheduler.port, "spw_bogus", [report])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stream(scheduler.port, tokens.clear["node-a"], [report])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_fleet_needs_an_operator_token(
    start_scheduler: SchedulerFactory, tokens: Tokens
) -> None:
    scheduler = await start_scheduler()
    address = f"127.0.0.1:{scheduler.port}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch_fleet(address, tokens.clear["node-a"], None)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch_fleet(address, "spw_bogus", None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await fetch_fleet(address, tokens.clear["oncall"], None)).agents == []


def _bad_reports() -> list[tuple[str, pb.CapacityReport]]:
    out_of_range = full_report("node-a", 1)
    out_of_range.gpus[0].index = 9
    nan_kv = full_report("node-a", 1, [REPLICA])
    nan_kv.replicas[0].load.kv_cache_usage = float("nan")
    unknown_gpu = full_report("node-a", 1, [REPLICA])
    unknown_gpu.replicas[0].gpu_indices.append(42)
    no_id = full_report("node-a", 1, [REPLICA])
    no_id.replicas[0].replica_id = ""
    return [
        ("gpus[0].index 9 is not a registered GPU", out_of_range),
        ("kv_cache_usage must be between 0 and 1", nan_kv),
        ("names GPU 42, not registered", unknown_gpu),
        ("replica_id is required", no_id),
    ]


async def test_bad_messages_get_invalid_argument_and_others_keep_reporting(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler(max_message_bytes=64 * 1024)
    port = scheduler.port
    await _register(port, registration("node-a"), tokens.clear["node-a"])
    async with reporting(scheduler, tokens, tmp_path, "node-b"):
        await eventually(lambda: (r := scheduler.fleet.get("node-b")) is not None and r.report)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # No serializers: these callables send raw bytes, so the test can send garbage.
            raw_register = channel.unary_unary(  # type: ignore[call-arg]
                "/spillway.v1.AgentService/Register"
            )
            raw_report = channel.stream_stream(  # type: ignore[call-arg]
                "/spillway.v1.AgentService/Report"
            )
            metadata = auth_metadata(tokens.clear["node-a"])
            garbage = b"\xff\xff\xff\xff\x0f not protobuf"
            oversized = registration("node-a")
            oversized.labels.extra["padding"] = "x" * (128 * 1024)
            for payload, expected in [
                (garbage, "not a valid spillway.v1.RegisterRequest"),
                (oversized.SerializeToString(), "exceeds the limit of 65536"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await raw_register(payload, metadata=metadata, timeout=5)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert expected in (caught.value.details() or "")

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw_report(iter([garbage]), metadata=metadata, timeout=5).read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        bad_registration = registration("node-a")
        bad_registration.gpus[3].index = 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _register(port, bad_registration, tokens.clear["node-a"])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "indexed 0..N-1" in (caught.value.details() or "")

        for expected, report in _bad_reports():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _stream(port, tokens.clear["node-a"], [report])
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
            assert expected in (caught.value.details() or "")

        # Nothing bad reached fleet state, and node-b's stream never noticed.
        assert scheduler.fleet.get("node-a").report is None  # type: ignore[union-attr]
        node_b = scheduler.fleet.get("node-b")
        assert node_b is not None
        before = node_b.reports_received
        await eventually(lambda: node_b.reports_received >= before + 2)
        # A good report from node-a is still accepted afterwards.
        acks = await _stream(port, tokens.clear["node-a"], [full_report("node-a", 7)])
        assert [ack.sequence for ack in acks] == [7]
        assert scheduler.service.rejected["INVALID_ARGUMENT"] == 2 + 1 + 1 + len(_bad_reports())


async def test_health_service_reports_serving(start_scheduler: SchedulerFactory) -> None:
    scheduler = await start_scheduler()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "spillway.v1.AgentService"):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_metrics_endpoint(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler(metrics_listen="127.0.0.1:0")
    assert scheduler.metrics_port
    async with (
        reporting(scheduler, tokens, tmp_path, "node-a", replicas=(REPLICA,)),
        reporting(scheduler, tokens, tmp_path, "node-b", gpus=2),
    ):
        await eventually(lambda: scheduler.fleet.reports_total >= 6)
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{scheduler.metrics_port}/metrics")
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert 'spillway_agents{health="connected"} 2.0' in lines
    assert 'spillway_gpus_free{pool="reserved-eu"} 6.0' in lines
    assert 'spillway_gpus_total{pool="reserved-eu"} 10.0' in lines
    assert "spillway_report_streams_open 2.0" in lines
    total = next(line for line in lines if line.startswith("spillway_reports_total "))
    assert float(total.split()[1]) >= 6
    rate = next(line for line in lines if line.startswith("spillway_reports_per_second "))
    assert float(rate.split()[1]) > 0
    delays = next(line for line in lines if line.startswith("spillway_report_delay_seconds_count"))
    assert float(delays.split()[1]) == float(total.split()[1])
    assert any(line.startswith('spillway_report_delay_seconds_bucket{le="0.1"}') for line in lines)


async def test_acknowledgements_are_sparse_and_in_order(
    start_scheduler: SchedulerFactory, tokens: Tokens
) -> None:
    scheduler = await start_scheduler()
    await _register(scheduler.port, registration("node-a"), tokens.clear["node-a"])
    reports = [full_report("node-a", n) for n in range(1, 26)]
    acks = await _stream(scheduler.port, tokens.clear["node-a"], reports)
    assert [ack.sequence for ack in acks] == [1, 11, 21]
    assert all(ack.report_interval.ToNanoseconds() == 200_000_000 for ack in acks)
    assert scheduler.fleet.get("node-a").reports_received == 25  # type: ignore[union-attr]
    buckets = dict(scheduler.service.report_delay.cumulative())
    assert buckets["+Inf"] == 25
