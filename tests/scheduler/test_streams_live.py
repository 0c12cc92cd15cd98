"""The bounds on what one authenticated client can do, over real gRPC on loopback: one process
per agent id, a revoked token ends its streams, silent streams are closed, fleet watches are
bounded, numbers are checked against the registration, sequences only go up, large messages
and a broken tokens file are refused cleanly, and refusals do not flood the log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from common.v1 import agent_pb2 as pb
from common.v1 import agent_pb2_grpc as pb_grpc
from scheduler.server import Scheduler
from tests.conftest import SchedulerFactory, Tokens, eventually
from tests.scheduler.test_server import REPLICA, full_report, registration, reporting

EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # the stubs lack it
SILENCE = 0.6  # the fixtures: stale after 3 report intervals of 0.2 s


def metadata(token: str, instance: str = "") -> tuple[tuple[str, str], ...]:
    bearer = ("authorization", f"Bearer {token}")
    return (bearer, ("spillway-instance", instance)) if instance else (bearer,)


class OpenStream:
    """A raw Report stream whose writes and end the test controls."""

    def __init__(self, port: int, token: str, instance: str = "") -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.AgentServiceStub(self.channel)
        self.call = stub.Report(metadata=metadata(token, instance))  # type: ignore[call-arg]

    async def send(self, report: pb.CapacityReport) -> None:
        await self.call.write(report)

    async def end(self, within_s: float = 5.0) -> tuple[grpc.StatusCode, str, float]:
        """Wait for the scheduler to end the stream: its code, details and how long it took."""
        start = time.monotonic()
        code = await asyncio.wait_for(self._drain(), within_s)
        return code, await self.call.details() or "", time.monotonic() - start

    async def _drain(self) -> grpc.StatusCode:
        # gRPC hands over the status only once every message before it has been read.
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await self.call.read() is not EOF:
                pass
        return await self.call.code()

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close(None)


async def _drained(call: grpc.aio.UnaryStreamCall[Any, Any]) -> grpc.StatusCode:
    """The call's status, once every message before it has been read (gRPC holds it back
    until then)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await call.read() is not EOF:
            pass
    return await call.code()


@contextlib.asynccontextmanager
async def opened(port: int, token: str, instance: str = "") -> AsyncIterator[OpenStream]:
    stream = OpenStream(port, token, instance)
    try:
        yield stream
    finally:
        await stream.close()


async def register(
    port: int, token: str, instance: str = "", request: pb.RegisterRequest | None = None
) -> pb.RegisterResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response: pb.RegisterResponse = await pb_grpc.AgentServiceStub(channel).Register(
            request or registration("node-a"), metadata=metadata(token, instance), timeout=5
        )
        return response


def holder(scheduler: Scheduler, agent_id: str) -> str | None:
    stream = scheduler.service.streams.report_stream(agent_id)
    return None if stream is None else stream.instance


# -- one process per agent id -------------------------------------------------------------------


async def test_a_second_process_with_the_same_id_is_refused_and_they_never_take_turns(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler()
    fleet = scheduler.fleet
    async with reporting(scheduler, tokens, tmp_path, "node-a") as first:
        await eventually(lambda: (r := fleet.get("node-a")) is not None and r.report)
        async with reporting(scheduler, tokens, tmp_path, "node-a") as second:
            assert first.instance != second.instance
            await eventually(lambda: second.last_error is not None, within_s=3)
            assert second.last_error is not None
            assert "ALREADY_EXISTS" in second.last_error and "'node-a'" in second.last_error
            before = fleet.get("node-a").reports_received  # type: ignore[union-attr]
            for _ in range(15):  # 3 s, many of the second's retries: the first never yields
                await asyncio.sleep(0.2)
                assert holder(scheduler, "node-a") == first.instance
                assert fleet.get("node-a").instance == first.instance  # type: ignore[union-attr]
            assert first.registrations == 1 and second.registrations == 0
            assert fleet.get("node-a").reports_received >= before + 10  # type: ignore[union-attr]
            assert scheduler.service.rejected["ALREADY_EXISTS"] >= 3
        # The second stopped; the first carries on, alone.
        assert holder(scheduler, "node-a") == first.instance
    # Once the first stops, another process may take the id at once (its stream ended).
    async with reporting(scheduler, tokens, tmp_path, "node-a") as third:
        await eventually(lambda: holder(scheduler, "node-a") == third.instance, within_s=3)
        assert third.registrations == 1


async def test_a_register_from_another_process_is_refused_while_the_first_reports(
    start_scheduler: SchedulerFactory, tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = await start_scheduler()
    port, token = scheduler.port, tokens.clear["node-a"]
    await register(port, token, "p1")
    async with opened(port, token, "p1") as first:
        await first.send(full_report("node-a", 1))
        await eventually(lambda: holder(scheduler, "node-a") == "p1")
        for other in ("p2", ""):  # another process, or one that does not say which it is
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await register(port, token, other)
            assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "agent 'node-a' is already connected" in (caught.value.details() or "")
            async with opened(port, token, other) as second:
                code, details, _ = await second.end()
                assert code == grpc.StatusCode.ALREADY_EXISTS, details
        # The same process may register again (it reconnects after a blip) ...
        await register(port, token, "p1")
        async with opened(port, token, "p1") as again:
            # ... and its new stream replaces the old one, which ends at once.
            await again.send(full_report("node-a", 1))
            code, details, took = await first.end()
            assert code == grpc.StatusCode.ALREADY_EXISTS
            assert "replaced by a newer report stream" in details
            assert took < 1.0
            # Silent past the limit, the stream is closed and another process may take over.
            code, details, took = await again.end(within_s=SILENCE + 2)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no report for 0.6s" in details
    await register(port, token, "p2")
    assert scheduler.fleet.get("node-a").instance == "p2"  # type: ignore[union-attr]
    async with opened(port, token, "p1") as stale:  # p1 no longer holds the registration
        await stale.send(full_report("node-a", 2))
        code, details, _ = await stale.end()
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "registered by another process" in details


async def test_an_agent_cannot_hold_many_silent_streams(
    start_scheduler: SchedulerFactory, tokens: Tokens
) -> None:
    scheduler = await start_scheduler()
    port, token = scheduler.port, tokens.clear["node-a"]
    await register(port, token, "p1")
    streams: list[OpenStream] = []
    try:
        for _ in range(100):  # each replaces the one before: one is open at any time
            streams.append(OpenStream(port, token, "p1"))
            await streams[-1].send(full_report("node-a", 1))
        await eventually(lambda: scheduler.service.open_streams == 1)
        ended = await asyncio.gather(*(s.end() for s in streams[:-1]))
        assert {code for code, _, _ in ended} == {grpc.StatusCode.ALREADY_EXISTS}
        # The last one, silent, is closed after the silence limit.
        code, _, _ = await streams[-1].end(within_s=SILENCE + 2)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert scheduler.service.open_streams == 0
        # Without an instance header a second stream is simply refused.
        anonymous = [OpenStream(port, token) for _ in range(20)]
        results = await asyncio.gather(*(s.end(within_s=SILENCE + 2) for s in anonymous))
        codes = [code for code, _, _ in results]
        assert codes.count(grpc.StatusCode.ALREADY_EXISTS) >= 19
        assert scheduler.service.open_streams == 0
        for stream in anonymous:
            await stream.close()
    finally:
        for stream in streams:
            await stream.close()


async def test_fleet_watches_are_bounded_per_gateway_id(
    start_scheduler: SchedulerFactory, tokens: Tokens
) -> None:
    tokens.add("gw-1", "gateway")
    scheduler = await start_scheduler()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
    stub = pb_grpc.GatewayServiceStub(channel)
    try:
        calls = [
            stub.WatchFleet(pb.WatchFleetRequest(), metadata=metadata(tokens.clear["gw-1"]))
            for _ in range(4)
        ]
        for call in calls:
            await call.read()  # the first fleet: the watch is open
        assert scheduler.service.open_watches == 4
        extra = stub.WatchFleet(pb.WatchFleetRequest(), metadata=metadata(tokens.clear["gw-1"]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await extra.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "gateway 'gw-1' already has 4 fleet watches open" in (caught.value.details() or "")
        calls[0].cancel()
        await eventually(lambda: scheduler.service.open_watches == 3)
        again = stub.WatchFleet(pb.WatchFleetRequest(), metadata=metadata(tokens.clear["gw-1"]))
        await again.read()
        again.cancel()
        for call in calls:
            call.cancel()
    finally:
        await channel.close(None)


# -- revoking a token ---------------------------------------------------------------------------


async def test_revoking_a_token_ends_its_open_streams_within_one_reload(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    tokens.add("node-c")
    tokens.add("gw-1", "gateway")
    reload_s = 0.5
    scheduler = await start_scheduler(
        tokens_reload_every_s=reload_s, stale_after_intervals=50, gone_after_intervals=100
    )
    port = scheduler.port
    await register(port, tokens.clear["node-c"], "c1", registration("node-c"))
    async with (
        reporting(scheduler, tokens, tmp_path, "node-a") as node_a,
        opened(port, tokens.clear["node-c"], "c1") as node_c,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        await node_c.send(full_report("node-c", 1))
        watch = pb_grpc.GatewayServiceStub(channel).WatchFleet(
            pb.WatchFleetRequest(), metadata=metadata(tokens.clear["gw-1"])
        )
        await watch.read()
        await eventually(lambda: scheduler.service.open_streams == 2)
        entries = yaml.safe_load(tokens.path.read_text())["tokens"]
        kept = [e for e in entries if e["id"] not in ("node-c", "gw-1")]
        tokens.path.write_text(yaml.safe_dump({"tokens": kept}))
        code, details, took = await node_c.end(within_s=reload_s + 1)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details == "the token was revoked"
        assert took < reload_s + 1
        assert await asyncio.wait_for(_drained(watch), 1) == grpc.StatusCode.UNAUTHENTICATED
        # node-a never noticed.
        received = scheduler.fleet.get("node-a").reports_received  # type: ignore[union-attr]
        await eventually(
            lambda: scheduler.fleet.get("node-a").reports_received >= received + 3  # type: ignore[union-attr]
        )
        assert node_a.registrations == 1
        assert holder(scheduler, "node-a") == node_a.instance
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # and node-c is out for good
            await register(port, tokens.clear["node-c"], "c1", registration("node-c"))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_broken_tokens_file_keeps_the_tokens_and_never_answers_unknown(
    start_scheduler: SchedulerFactory, tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = await start_scheduler(tokens_reload_every_s=0.1)
    port = scheduler.port
    good = tokens.path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="scheduler.auth"):
        for broken in (b"\xff\xfe\x00\x01binary", b"", good[: len(good) // 2] + b"\x00", b"\x80"):
            tokens.path.write_bytes(broken)
            for _ in range(3):  # several reload ticks, and calls that stat the file
                await asyncio.sleep(0.12)
                await register(port, tokens.clear["node-a"], "p1")
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await register(port, "spw_nobody", "p1")
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    refusals = [r for r in caplog.records if "keeping the previous tokens" in r.getMessage()]
    assert len(refusals) == 4, [r.getMessage() for r in refusals]
    assert scheduler.service.rejected.get("UNKNOWN", 0) == 0
    assert scheduler.service.tokens.errors


# -- what a report may say ----------------------------------------------------------------------


def _hostile_reports() -> list[tuple[str, pb.CapacityReport]]:
    cases = []
    huge_memory = full_report("node-a", 1)
    huge_memory.gpus[0].memory_used_bytes = 1 << 62
    cases.append(
        ("gpus[0].memory_used_bytes 4611686018427387904 is more than GPU 0 has", huge_memory)
    )
    for value in (float("nan"), float("inf"), -0.1, 1.5):
        bad = full_report("node-a", 1)
        bad.gpus[3].utilization = value
        cases.append(("gpus[3].utilization must be between 0 and 1", bad))
    missing = full_report("node-a", 1, gpus=7)
    cases.append(("it must list every one of the 8 registered, each once", missing))
    twice = full_report("node-a", 1)
    twice.gpus[5].index = 4
    cases.append(("gpus[5].index 4 is listed twice", twice))
    port = full_report("node-a", 1, [REPLICA])
    port.replicas[0].port = 70000
    cases.append(("replicas[0].port must be 0..65535", port))
    queued = full_report("node-a", 1, [REPLICA])
    queued.replicas[0].load.queued_requests = 4_000_000_000
    cases.append(("replicas[0].load.queued_requests must be 0..1000000", queued))
    tokens = full_report("node-a", 1, [REPLICA])
    tokens.replicas[0].load.generation_tokens_per_second = 1e300
    cases.append(("generation_tokens_per_second must be a finite number from 0 to 1e+09", tokens))
    shared = full_report("node-a", 1, [REPLICA])
    shared.replicas[0].gpu_indices[:] = [1, 1]
    cases.append(("replicas[0].gpu_indices names GPU 1 twice", shared))
    again = full_report("node-a", 1, [REPLICA, REPLICA])
    cases.append(("replicas[1].replica_id 'llama-70b-0' is listed twice", again))
    late = full_report("node-a", 1)
    late.sent_at.seconds = 1 << 40
    cases.append(("sent_at must be between 1970-01-01 and 9999-12-31", late))
    return cases


@pytest.mark.parametrize(("expected", "report"), _hostile_reports())
async def test_a_report_the_registration_contradicts_is_refused_and_not_applied(
    start_scheduler: SchedulerFactory, tokens: Tokens, expected: str, report: pb.CapacityReport
) -> None:
    scheduler = await start_scheduler()
    port, token = scheduler.port, tokens.clear["node-a"]
    await register(port, token, "p1")
    async with opened(port, token, "p1") as stream:
        await stream.send(report)
        code, details, _ = await stream.end()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in details
    assert scheduler.fleet.get("node-a").report is None  # type: ignore[union-attr]


@pytest.mark.parametrize("second", [5, 4])
async def test_sequence_numbers_only_go_up_within_a_stream(
    start_scheduler: SchedulerFactory, tokens: Tokens, second: int
) -> None:
    scheduler = await start_scheduler()
    port, token = scheduler.port, tokens.clear["node-a"]
    await register(port, token, "p1")
    async with opened(port, token, "p1") as stream:
        await stream.send(full_report("node-a", 5))
        await stream.send(full_report("node-a", second))
        code, details, _ = await stream.end()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        details
        == f"sequence {second} must be greater than the previous report's (5) on this stream"
    )
    assert scheduler.fleet.get("node-a").report.sequence == 5  # type: ignore[union-attr]
    # A new stream starts its own count.
    async with opened(port, token, "p1") as stream:
        await stream.send(full_report("node-a", 1))
        await eventually(lambda: scheduler.fleet.get("node-a").report.sequence == 1)  # type: ignore[union-attr]


async def test_a_registration_out_of_range_is_refused(
    start_scheduler: SchedulerFactory, tokens: Tokens
) -> None:
    scheduler = await start_scheduler()
    request = registration("node-a")
    request.gpus[2].memory_total_bytes = (1 << 44) + 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(scheduler.port, tokens.clear["node-a"], "p1", request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gpus[2].memory_total_bytes 17592186044417 is more than" in (
        caught.value.details() or ""
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(scheduler.port, tokens.clear["node-a"], "not an id!")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spillway-instance header" in (caught.value.details() or "")


# -- message size -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "code"),
    [
        (64 * 1024 + 1, grpc.StatusCode.INVALID_ARGUMENT),  # just past max_message_bytes
        (4 * 64 * 1024, grpc.StatusCode.INVALID_ARGUMENT),  # up to the transport's limit
        (4 * 64 * 1024 + 64, grpc.StatusCode.RESOURCE_EXHAUSTED),  # gRPC's own refusal
        (64 << 20, grpc.StatusCode.RESOURCE_EXHAUSTED),  # refused by its length prefix
    ],
)
async def test_a_message_over_the_limit_is_refused_as_documented(
    start_scheduler: SchedulerFactory, tokens: Tokens, size: int, code: grpc.StatusCode
) -> None:
    scheduler = await start_scheduler(max_message_bytes=64 * 1024)
    request = registration("node-a")
    pad = size - request.ByteSize()
    for _ in range(5):  # the length prefixes around the padding grow with it
        request.labels.extra["padding"] = "x" * pad
        pad -= request.ByteSize() - size
    assert request.ByteSize() == size
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{scheduler.port}", options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        raw = channel.unary_unary("/spillway.v1.AgentService/Register")  # type: ignore[call-arg]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(
                request.SerializeToString(), metadata=metadata(tokens.clear["node-a"]), timeout=10
            )
        assert caught.value.code() == code
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert "exceeds the limit of 65536" in (caught.value.details() or "")
    response = await register(scheduler.port, tokens.clear["node-a"], "p1")  # still serving
    assert response.scheduler_instance == scheduler.instance


# -- the log ------------------------------------------------------------------------------------


async def test_refusals_are_counted_each_but_logged_a_few_lines(
    start_scheduler: SchedulerFactory, tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = await start_scheduler(metrics_listen="127.0.0.1:0")
    with caplog.at_level(logging.WARNING, logger="scheduler.server"):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}") as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            for _ in range(230):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Register(
                        registration("node-a"), metadata=metadata("spw_bogus"), timeout=5
                    )
    lines = [r.getMessage() for r in caplog.records if r.name == "scheduler.server"]
    assert lines == [
        "refused a call from ipv4:127.0.0.1: UNAUTHENTICATED: missing or unknown bearer token"
    ]
    assert scheduler.service.rejected["UNAUTHENTICATED"] == 230
    async with httpx.AsyncClient() as client:
        page = (await client.get(f"http://127.0.0.1:{scheduler.metrics_port}/metrics")).text
    assert 'spillway_rejected_calls_total{code="UNAUTHENTICATED"} 230.0' in page.splitlines()
    assert "spillway_tokens 3.0" in page.splitlines()
