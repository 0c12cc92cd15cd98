"""Adaptive admission against real replicas: when a replica's time to first token climbs, the
gateway counts it as full and overflows to the managed endpoint before the target is broken,
long before the static cap; with only the static cap nothing overflows."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from gateway.app import Gateway
from tests.gateway.conftest import (
    MODEL,
    FakeScheduler,
    GatewayFactory,
    ReplicaFactory,
    SimReplica,
    deployment,
    managed_endpoint,
    metric,
    routable,
)

TTFT_S = 2.0
#: About 1,000 prompt tokens: a fast first token on an idle simulated replica.
SHORT = "word " * 800
#: About 4,000 prompt tokens each: a prefill backlog of several seconds for a dozen of them.
LONG = "word " * 3200


async def _one(http: aiohttp.ClientSession, url: str) -> tuple[str, float, float]:
    """(tier, when sent, seconds to the first byte of the body) of one streamed request."""
    body = {"model": MODEL, "prompt": SHORT, "max_tokens": 4, "stream": True}
    sent = time.monotonic()
    async with http.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        await r.content.readany()
        first = time.monotonic() - sent
        await r.read()
        return r.headers["x-spillway-tier"], sent, first


async def _slow_down(http: aiohttp.ClientSession, replica: SimReplica) -> list[asyncio.Task[Any]]:
    """Load the replica from outside the gateway (another client of it): the gateway's own
    count on it stays what it was, only its time to first token tells."""
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 1}

    async def one() -> None:
        async with http.post(replica.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            await r.read()

    tasks = [asyncio.create_task(one()) for _ in range(12)]
    await asyncio.sleep(0.05)  # they are in the replica's queue
    return tasks


async def _run(
    gateway: Gateway, http: aiohttp.ClientSession, replica: SimReplica
) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]], list[float]]:
    url = gateway.url + "/v1/completions"
    quiet = [await _one(http, url) for _ in range(5)]  # one at a time: fast first tokens
    limits: list[float] = []

    async def watch() -> None:
        while True:
            limits.append(
                metric(
                    gateway,
                    "spillway_gateway_replica_concurrency_limit",
                    deployment="chat",
                    replica=replica.replica_id,
                )
            )
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    flood = await _slow_down(http, replica)
    tasks = []
    for _ in range(30):  # 10 requests/s for 3 s through the gateway
        tasks.append(asyncio.create_task(_one(http, url)))
        await asyncio.sleep(0.1)
    busy = list(await asyncio.gather(*tasks))
    watcher.cancel()
    await asyncio.gather(*flood)
    return quiet, busy, limits


async def test_a_slowing_replica_overflows_before_the_ttft_target_breaks(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    adaptive, fixed = await replicas("r-eu-0", "r-eu-1")
    (hosted,) = await replicas("hosted", extra=("--speedup", "20"))
    endpoint = managed_endpoint(hosted.url, max_concurrency=256)
    slo = {"ttft_s": TTFT_S}

    scheduler.set_fleet([routable(adaptive)])
    spec = deployment(
        managed=[endpoint],
        max_concurrency_per_replica=256,
        # Slow after 1 s; a limit of 16 to begin with, and kept through the quiet start.
        admission={"target_share": 0.5, "initial_concurrency": 16, "window_s": 60},
    )
    gateway = await start_gateway({"chat": {**spec, "slo": slo}}, scheduler)
    quiet, busy, limits = await _run(gateway, http, adaptive)
    await gateway.stop()

    assert {tier for tier, _, _ in quiet} == {"reserved"}
    assert max(first for _, _, first in quiet) < 0.5 * TTFT_S
    to_replica = [(sent, first) for tier, sent, first in busy if tier == "reserved"]
    to_managed = [sent for tier, sent, _ in busy if tier == "managed"]
    assert to_replica and to_managed, busy
    # The overflow began before the first request the slow replica took had waited out the
    # target, and before the limit of 16 was reached: it followed the latency.
    started = min(sent for sent, _ in to_replica)
    assert min(to_managed) < started + TTFT_S, (started, sorted(to_managed)[:3])
    assert len(to_replica) < 16, busy
    # Once the overflow began, the replica got nothing more until it answered in time again.
    assert all(sent < min(to_managed) or first < TTFT_S for sent, first in to_replica), busy
    assert limits[0] == 16 and min(limits) <= 9, limits  # 0.9 x the 10 in flight, or less

    # The same load with only the static cap: it all waits behind the replica's backlog.
    scheduler.set_fleet([routable(fixed)])
    spec = deployment(
        managed=[endpoint], max_concurrency_per_replica=256, admission={"adaptive": False}
    )
    gateway = await start_gateway({"chat": {**spec, "slo": slo}}, scheduler)
    _, busy, limits = await _run(gateway, http, fixed)
    assert {tier for tier, _, _ in busy} == {"reserved"}
    assert sum(first > TTFT_S for _, _, first in busy) > 15, busy
    assert set(limits) == {256.0}
