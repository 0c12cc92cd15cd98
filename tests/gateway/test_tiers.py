"""Where requests go: reserved first, then rented, then managed endpoints, then the queue;
never outside the residency lock; a session stays on its replica."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.gateway.conftest import (
    MODEL,
    FakeScheduler,
    GatewayFactory,
    ReplicaFactory,
    deployment,
    managed_endpoint,
    metric,
    rented,
    routable,
    until,
)

LONG = {"model": MODEL, "prompt": "tier order", "max_tokens": 40, "stream": True}


async def test_reserved_then_rented_then_managed_then_queue_and_never_outside_the_lock(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    reserved, spilled, outside, hosted = await replicas(
        "r-eu-0", "s-eu-0", "s-us-0", "hosted", extra=("--max-running-requests", "1")
    )
    scheduler.set_fleet(
        [
            routable(reserved, max_running=1),
            rented(spilled, max_running=1),
            rented(outside, region="us-east-1", max_running=1),  # outside the eu lock
        ]
    )
    endpoint = managed_endpoint(hosted.url, max_concurrency=1)
    gateway = await start_gateway({"chat": deployment(managed=[endpoint])}, scheduler)
    url = gateway.url + "/v1/completions"

    first = await http.post(url, json=LONG)  # returns at the first streamed byte
    second = await http.post(url, json=LONG)
    third = await http.post(url, json=LONG)
    order = [
        (r.headers["x-spillway-tier"], r.headers["x-spillway-target"])
        for r in (first, second, third)
    ]
    assert order == [("reserved", "r-eu-0"), ("rented", "s-eu-0"), ("managed", "hosted")]

    fourth = asyncio.create_task(http.post(url, json=LONG))
    dep = gateway.deployments.by_name["chat"]
    await until(lambda: len(dep.queue) == 1, 2.0, "the fourth request queued")
    assert metric(gateway, "spillway_gateway_queue_depth", deployment="chat") == 1
    await first.read()  # the reserved replica frees first ...
    waited = await fourth
    assert waited.headers["x-spillway-tier"] == "reserved"  # ... and the queue goes back to it
    for response in (second, third, waited):
        assert b"[DONE]" in await response.read()

    assert await outside.requests_total() == 0  # the lock holds even with everything full
    assert metric(gateway, "spillway_gateway_residency_refusals_total", deployment="chat") == 0
    overflow = metric(
        gateway, "spillway_gateway_overflow_tokens_total", deployment="chat", endpoint="hosted"
    )
    assert overflow > 0
    await until(
        lambda: any(d.overflow_tokens_per_s > 0 for r in scheduler.reports for d in r.deployments),
        3.0,
        "overflow reported to the scheduler",
    )
    traffic = dep.traffic(time.monotonic())
    assert {k: v.requests for k, v in traffic.tiers.items()} == {
        "reserved": 2,
        "rented": 1,
        "managed": 1,
    }


async def test_a_session_stays_on_its_replica(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    a, b = await replicas("r-eu-0", "r-eu-1", extra=("--speedup", "50"))
    scheduler.set_fleet([routable(a), routable(b)])
    gateway = await start_gateway({"chat": deployment()}, scheduler)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def target(headers: dict[str, str], payload: dict[str, Any] = body) -> str:
        async with http.post(
            gateway.url + "/v1/chat/completions", json=payload, headers=headers
        ) as r:
            assert r.status == 200
            return r.headers["x-spillway-target"]

    for session in ("alice", "bob", "carol", "dave"):
        seen = {await target({"x-session-id": session}) for _ in range(4)}
        assert len(seen) == 1, (session, seen)
    by_user = {await target({}, {**body, "user": "erin"}) for _ in range(4)}
    assert len(by_user) == 1
    # Without a session: the prompt's beginning keeps a conversation together.
    convo = {**body, "messages": [{"role": "system", "content": "You are terse. " * 20}]}
    assert len({await target({}, convo) for _ in range(4)}) == 1
    spread = {await target({"x-session-id": f"s{i}"}) for i in range(16)}
    assert spread == {"r-eu-0", "r-eu-1"}


@pytest.fixture
async def recording_endpoint() -> Any:
    """A managed endpoint in this process that records what it was sent."""
    seen: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.path, dict(request.headers), body))
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        return web.json_response(
            {"id": "x", "object": "chat.completion", "choices": [], "usage": usage}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_post("/v1/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_managed_endpoint_gets_its_key_and_model_name_and_never_generate(
    recording_endpoint: Any,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, seen = recording_endpoint
    monkeypatch.setenv("HOSTED_API_KEY", "hosted-secret")
    endpoint = managed_endpoint(url, api_key_env="HOSTED_API_KEY", model="hosted-name")
    dep = deployment(managed=[endpoint], queue_timeout_s=0.4)
    gateway = await start_gateway({"chat": dep}, scheduler)  # no replica at all
    raw = b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "x": 1}'
    async with http.post(gateway.url + "/v1/chat/completions", data=raw) as r:
        assert r.status == 200 and r.headers["x-spillway-tier"] == "managed"
        assert (await r.json())["usage"]["completion_tokens"] == 3
    path, headers, body = seen[-1]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer hosted-secret"
    assert body == {**json.loads(raw), "model": "hosted-name"}  # renamed; the rest as sent
    assert (
        metric(
            gateway,
            "spillway_gateway_tokens_total",
            deployment="chat",
            tier="managed",
            direction="input",
        )
        == 7
    )

    # /generate is SGLang's own: never to a managed endpoint; it waits, then 503.
    gen = {"model": MODEL, "text": "hi"}
    async with http.post(gateway.url + "/generate", json=gen) as r:
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["code"] == "queue_timeout"
    assert all(p != "/generate" for p, _, _ in seen)
