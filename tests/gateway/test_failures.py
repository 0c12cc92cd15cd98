"""When things break: a replica killed under load, a replica drained, the scheduler gone, a
broken policy edit. Nothing that had not started is lost; nothing in flight on a draining
replica is dropped; routing goes on with the last fleet."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.v1 import agent_pb2 as pb
from tests.conftest import write_yaml
from tests.gateway.conftest import (
    MODEL,
    FakeScheduler,
    GatewayFactory,
    ReplicaFactory,
    deployment,
    metric,
    routable,
    until,
)


def _completion(tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "keep going", "max_tokens": tokens, "stream": stream}


async def _complete(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str]:
    async with http.post(url + "/v1/completions", json=body) as r:
        await r.read()
        return r.status, r.headers.get("x-spillway-target", "")


async def test_a_replica_killed_under_load_loses_no_request_that_had_not_started(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    a, b = await replicas("r-eu-0", "r-eu-1", extra=("--max-running-requests", "2"))
    scheduler.set_fleet([routable(a, max_running=2), routable(b, max_running=2)])
    gateway = await start_gateway({"chat": deployment(queue_timeout_s=30)}, scheduler)
    dep = gateway.deployments.by_name["chat"]

    # A stream is under way on one replica: that replica is the one that dies.
    stream = await http.post(gateway.url + "/v1/completions", json=_completion(400, True))
    victim_id = stream.headers["x-spillway-target"]
    victim, survivor = (a, b) if victim_id == a.replica_id else (b, a)
    assert (await stream.content.readany()).startswith(b"data: ")

    load = [asyncio.create_task(_complete(http, gateway.url, _completion(30))) for _ in range(8)]
    await until(lambda: len(dep.queue) == 5, 3.0, "three in flight, five queued")
    await asyncio.sleep(0.1)
    victim.kill()

    results = await asyncio.gather(*load)
    assert [status for status, _ in results] == [200] * 8, results
    assert {target for _, target in results} == {survivor.replica_id}
    rest = await stream.read()
    assert b"event: error" in rest  # the stream that had started gets a clean error
    assert (
        metric(gateway, "spillway_gateway_errors_total", deployment="chat", kind="mid_stream") == 1
    )
    retries = metric(gateway, "spillway_gateway_retries_total", deployment="chat")
    print(f"killed {victim_id}: 8/8 answered by {survivor.replica_id}, {retries:.0f} retried")
    assert retries >= 1
    # The fleet still says healthy (no report yet); the gateway's own health check holds it.
    assert dep.replicas[victim_id].down and dep.replicas[victim_id].healthy
    assert metric(gateway, "spillway_gateway_replicas_down") == 1
    for _ in range(3):
        assert (await _complete(http, gateway.url, _completion(2)))[1] == survivor.replica_id


async def test_a_draining_replica_finishes_its_requests_and_gets_no_new_ones(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    a, b = await replicas("r-eu-0", "r-eu-1", extra=("--speedup", "2"))
    scheduler.set_fleet([routable(a), routable(b)])
    gateway = await start_gateway(
        {"chat": deployment(max_concurrency_per_replica=2, affinity=False)}, scheduler
    )
    dep = gateway.deployments.by_name["chat"]
    first = [asyncio.create_task(_complete(http, gateway.url, _completion(60))) for _ in range(4)]
    await until(lambda: dep.replicas["r-eu-0"].in_flight == 2, 3.0)
    scheduler.set_fleet([routable(a, state=pb.REPLICA_STATE_DRAINING), routable(b)])
    await until(lambda: not dep.replicas["r-eu-0"].healthy, 2.0, "the drain reached the gateway")
    later = [asyncio.create_task(_complete(http, gateway.url, _completion(5))) for _ in range(4)]
    done_first = await asyncio.gather(*first)
    done_later = await asyncio.gather(*later)
    assert [s for s, _ in done_first + done_later] == [200] * 8  # zero dropped
    assert sorted(t for _, t in done_first) == ["r-eu-0", "r-eu-0", "r-eu-1", "r-eu-1"]
    assert {t for _, t in done_later} == {"r-eu-1"}
    assert await a.requests_total() == 2


async def test_routing_goes_on_with_the_last_fleet_while_the_scheduler_is_away(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    (replica,) = await replicas("r-eu-0", extra=("--speedup", "50"))
    scheduler.set_fleet([routable(replica)])
    gateway = await start_gateway({"chat": deployment()}, scheduler)
    await scheduler.stop()
    await until(lambda: not gateway.link.state.connected, 5.0, "the gateway noticed")
    for _ in range(3):
        assert await _complete(http, gateway.url, _completion(2)) == (200, "r-eu-0")

    # A new scheduler process knows no replica yet: the gateway keeps the ones it knew.
    watches = scheduler.watches
    await scheduler.restart()
    took = await until(lambda: gateway.link.state.connected, 5.0, "reconnected")
    assert scheduler.watches > watches
    print(f"reconnected {took * 1000:.0f} ms after the scheduler came back")
    assert await _complete(http, gateway.url, _completion(2)) == (200, "r-eu-0")
    scheduler.set_fleet([routable(replica)])  # the agents report again
    await asyncio.sleep(0.6)  # past the restart grace (two intervals)
    assert set(gateway.deployments.fleet.replicas) == {"r-eu-0"}
    assert await _complete(http, gateway.url, _completion(2)) == (200, "r-eu-0")
    # A replica the new scheduler really lost is gone after the grace.
    scheduler.set_fleet([])
    await until(lambda: not gateway.deployments.fleet.replicas, 2.0)


async def test_policy_reload_and_a_broken_edit_that_keeps_the_old_policy(
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await start_gateway({"chat": deployment()}, scheduler)

    async def models() -> list[str]:
        async with http.get(gateway.url + "/v1/models") as r:
            return [m["id"] for m in (await r.json())["data"]]

    assert await models() == [MODEL]
    two = {"chat": deployment(), "other": deployment(model="other-model", pools=["p2"])}
    policy = write_yaml(tmp_path / "policy.yaml", {"deployments": two})
    deadline = time.monotonic() + 3
    while await models() != [MODEL, "other-model"]:
        assert time.monotonic() < deadline, "the edit was not picked up"
        await asyncio.sleep(0.05)

    caplog.set_level(logging.ERROR, logger="gateway.targets")
    policy.write_text(policy.read_text().replace("max_replicas: 4", "max_replicas: -1", 1))
    await until(lambda: gateway.policy_file.rejected == 1, 3.0, "the broken edit refused")
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and "\n" not in refused[0].getMessage()
    assert "max_replicas" in refused[0].getMessage()
    assert await models() == [MODEL, "other-model"]  # the old policy stays in force
    assert metric(gateway, "spillway_gateway_policy_rejected_total") == 1
