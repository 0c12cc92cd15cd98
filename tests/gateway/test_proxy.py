"""Requests through a real gateway to real simulated replicas: the official OpenAI SDK,
streaming and not, SGLang's /generate, errors, and a client that leaves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.gateway.conftest import (
    MODEL,
    FakeScheduler,
    GatewayFactory,
    ReplicaFactory,
    SimReplica,
    deployment,
    metric,
    routable,
    until,
)


async def test_openai_sdk_through_the_gateway(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    (replica,) = await replicas("r-eu-0", extra=("--speedup", "50"))
    scheduler.set_fleet([routable(replica)])
    gateway = await start_gateway({"chat": deployment()}, scheduler)
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=5
        )
        assert raw.headers["x-spillway-tier"] == "reserved"
        assert raw.headers["x-spillway-target"] == "r-eu-0"
        chat = raw.parse()
        assert chat.usage is not None and chat.usage.completion_tokens == 5
        assert chat.choices[0].message.content

        # Streaming, with the usage block at the end.
        stream = await client.chat.completions.create(
            model="chat",  # the deployment's own name works too
            messages=[{"role": "user", "content": "stream please"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 6

        done = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=3)
        assert done.usage is not None and done.usage.completion_tokens == 3
        pieces = [
            c
            async for c in await client.completions.create(
                model=MODEL, prompt="once upon", max_tokens=4, stream=True
            )
        ]
        assert "".join(p.choices[0].text for p in pieces if p.choices)

        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
    finally:
        await client.close()

    # SGLang's native /generate, by model and by path prefix, streaming and not.
    body = {"model": MODEL, "text": "hi", "sampling_params": {"max_new_tokens": 4}}
    async with http.post(gateway.url + "/generate", json=body) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["meta_info"]["completion_tokens"] == 4
    async with http.post(gateway.url + "/chat/generate", json={**body, "stream": True}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        assert b"data: [DONE]" in await r.read()
    chat_body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    async with http.post(gateway.url + "/chat/v1/chat/completions", json=chat_body) as r:
        assert r.status == 200 and r.headers["x-spillway-target"] == "r-eu-0"

    # Tokens per tier, from the usage blocks (one stream without usage is estimated).
    assert (
        metric(
            gateway,
            "spillway_gateway_requests_total",
            deployment="chat",
            tier="reserved",
            code="200",
        )
        == 7
    )
    traffic = {d.deployment: d for d in gateway.deployments.traffic()}["chat"]
    assert traffic.tiers["reserved"].requests == 7
    assert traffic.tiers["reserved"].output_tokens >= 5 + 6 + 3 + 4 + 4 + 2
    await until(
        lambda: any(
            d.tiers and d.tiers[0].requests == 7 for r in scheduler.reports for d in r.deployments
        ),
        3.0,
        "a traffic report with the totals",
    )
    assert gateway.deployments.by_name["chat"].replicas["r-eu-0"].in_flight == 0


async def test_errors_are_openai_shaped_and_the_server_keeps_serving(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    (replica,) = await replicas("r-eu-0", extra=("--speedup", "50"))
    scheduler.set_fleet([routable(replica)])
    gateway = await start_gateway(
        {"chat": deployment(), "other": deployment(model="other-model", pools=["p2"])}, scheduler
    )
    url = gateway.url + "/v1/chat/completions"
    async with http.post(url, data=b"{not json") as r:
        assert r.status == 400
        error = (await r.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    async with http.post(url, data=b"[1, 2]") as r:
        assert r.status == 400
    async with http.post(url, json={"model": "nope", "messages": []}) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "model_not_found"
    async with http.post(url, json={"messages": []}) as r:  # two deployments: say which
        assert r.status == 400 and (await r.json())["error"]["param"] == "model"
    async with http.post(gateway.url + "/nowhere/v1/chat/completions", json={}) as r:
        assert r.status == 404 and "error" in await r.json()
    async with http.get(gateway.url + "/other/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["other-model"]
    async with http.get(gateway.url + "/health") as r:
        health = await r.json()
        assert health["status"] == "ok" and health["scheduler"] == "connected"

    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=[])
        ok = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "still there?"}], max_tokens=2
        )
        assert ok.choices
    finally:
        await client.close()
    async with http.get(gateway.url + "/metrics") as r:
        text = await r.text()
    assert (
        'spillway_gateway_requests_total{code="200",deployment="chat",tier="reserved"} 1.0' in text
    )
    assert "spillway_gateway_residency_refusals_total" not in text or (
        'spillway_gateway_residency_refusals_total{deployment="chat"} 0.0' in text
    )


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_leaves_cancels_its_upstream_request(
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    stream: bool,
) -> None:
    """Streaming: gone after the first chunk. Not streaming: gone during a long prefill,
    before any byte. Either way the replica sees the cancel at once."""
    (replica,) = await replicas("r-eu-0")  # real speed: ~20k prompt tokens take ~2 s
    scheduler.set_fleet([routable(replica)])
    gateway = await start_gateway({"chat": deployment()}, scheduler)
    prompt = "abcd" * (20_000 if not stream else 10)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2000, "stream": stream}
    async with aiohttp.ClientSession() as session:
        if stream:
            response = await session.post(gateway.url + "/v1/completions", json=body)
            assert response.status == 200
            assert (await response.content.readany()).startswith(b"data: ")
            await until_running(replica, 1)
            left = time.monotonic()
            response.close()  # the client goes away mid-stream
        else:
            task = asyncio.create_task(session.post(gateway.url + "/v1/completions", json=body))
            await until_running(replica, 1)
            await asyncio.sleep(0.3)  # well inside the prefill
            left = time.monotonic()
            task.cancel()  # the client goes away before the first byte
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await until_running(replica, 0, within_s=2.0)
    took = time.monotonic() - left
    print(f"upstream cancelled {took * 1000:.0f} ms after the client left (stream={stream})")
    assert took < 1.0
    dep = gateway.deployments.by_name["chat"]
    await until(lambda: dep.replicas["r-eu-0"].in_flight == 0, 2.0, "in-flight back to 0")
    assert (
        metric(
            gateway,
            "spillway_gateway_requests_total",
            deployment="chat",
            tier="reserved",
            code="499",
        )
        == 1
    )


async def until_running(replica: SimReplica, n: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while (await replica.running()) != n:
        assert time.monotonic() < deadline, f"{replica.replica_id} never had {n} running"
        await asyncio.sleep(0.02)


async def test_replicas_that_need_an_api_key_get_the_gateways(
    tmp_path: Path,
    replicas: ReplicaFactory,
    scheduler: FakeScheduler,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    """A replica started with --api-key (as the agent starts every replica when its
    runtime.api_key_file is set) answers the gateway that sends the key, and no one else."""
    (replica,) = await replicas("r-key", extra=("--speedup", "50", "--api-key", "k-123"))
    scheduler.set_fleet([routable(replica)])
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with http.post(f"{replica.url}/v1/chat/completions", json=body) as direct:
        assert direct.status == 401  # the replica itself refuses a call without the key
    key_file = tmp_path / "replica.key"
    key_file.write_text("k-123\n")
    keyed = await start_gateway({"chat": deployment()}, scheduler, replica_api_key_file=key_file)
    async with http.post(f"{keyed.url}/v1/chat/completions", json=body) as answer:
        assert answer.status == 200, await answer.text()
    bare = await start_gateway({"chat": deployment()}, scheduler)
    async with http.post(f"{bare.url}/v1/chat/completions", json=body) as refused:
        assert refused.status == 401  # the replica's own answer, passed through
        assert (await refused.json())["message"] == "missing or wrong API key"
