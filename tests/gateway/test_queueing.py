"""The bounded queue, live: a cold start waits for the first replica; a full queue refuses with
429 (sheddable requests first); a request that waits too long gets 503; every refusal says when
to come back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp

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

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "anyone?"}], "max_tokens": 3}


async def _post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_cold_start_queues_until_the_first_replica_is_healthy(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway({"chat": deployment(queue_timeout_s=20)}, scheduler)
    dep = gateway.deployments.by_name["chat"]
    sent = time.monotonic()
    waiting = [asyncio.create_task(_post(http, gateway.url)) for _ in range(3)]
    await until(lambda: len(dep.queue) == 3, 2.0, "three requests queued at zero replicas")
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in waiting)  # queued, not refused at once

    (replica,) = await replicas("r-eu-0", extra=("--speedup", "20"))
    healthy_at = time.monotonic()
    scheduler.set_fleet([routable(replica)])
    results = await asyncio.gather(*waiting)
    done = time.monotonic()
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert {h["x-spillway-target"] for _, _, h in results} == {"r-eu-0"}
    print(
        f"cold start: queued {healthy_at - sent:.2f}s at zero replicas; answered "
        f"{(done - healthy_at) * 1000:.0f} ms after the replica was reported healthy"
    )
    assert done - healthy_at < 2.0
    assert metric(gateway, "spillway_gateway_queue_wait_seconds_count", deployment="chat") == 3
    assert dep.refused == 0


async def test_queue_size_sheds_sheddable_first_and_timeout_answers_503(
    scheduler: FakeScheduler, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(
        {"chat": deployment(queue_size=2, queue_timeout_s=1.0)}, scheduler
    )
    dep = gateway.deployments.by_name["chat"]
    shed = {"x-spillway-priority": "sheddable"}
    normal = asyncio.create_task(_post(http, gateway.url))
    sheddable = asyncio.create_task(_post(http, gateway.url, shed))
    await until(lambda: len(dep.queue) == 2, 2.0)

    # A normal request finds the queue full: the sheddable waiter is refused in its place.
    second = asyncio.create_task(_post(http, gateway.url))
    status, body, headers = await sheddable
    assert status == 429 and body["error"]["code"] == "shed"
    assert int(headers["Retry-After"]) >= 1
    await until(lambda: len(dep.queue) == 2, 2.0)
    # A sheddable one, and then a normal one with no sheddable waiter left: refused at once.
    for extra in (shed, None):
        status, body, headers = await _post(http, gateway.url, extra)
        assert status == 429 and body["error"]["code"] == "queue_full"
        assert body["error"]["type"] == "rate_limit_error" and "Retry-After" in headers

    # The two waiting ones reach the deadline: 503 with Retry-After.
    for task in (normal, second):
        status, body, headers = await task
        assert status == 503 and body["error"]["code"] == "queue_timeout"
        assert int(headers["Retry-After"]) >= 1

    # A client that leaves the queue leaves it at once.
    leaving = asyncio.create_task(_post(http, gateway.url))
    await until(lambda: len(dep.queue) == 1, 2.0)
    leaving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    await until(lambda: len(dep.queue) == 0, 1.0, "the queue forgot the client that left")

    def refusals(reason: str) -> float:
        return metric(gateway, "spillway_gateway_refusals_total", deployment="chat", reason=reason)

    assert (refusals("shed"), refusals("queue_full"), refusals("queue_timeout")) == (1, 2, 2)
    assert metric(gateway, "spillway_gateway_queue_timeouts_total", deployment="chat") == 2
    assert dep.refused == 5
    await until(lambda: any(d.refused == 5 for r in scheduler.reports for d in r.deployments), 3.0)
