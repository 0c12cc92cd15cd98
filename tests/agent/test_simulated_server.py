"""The simulated runtime as a real process speaking SGLang's HTTP API on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from agent.runtimes import LaunchSpec, ServerClient, SimulatedRuntime
from agent.runtimes.base import parse_loads, parse_metrics
from agent.runtimes.simulated_server import SimulatedServer, make_profile, make_runner, parse_args
from agent.runtimes.simulated_text import chat_tokens, count_tokens, prefix_hashes, text_tokens


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """The simulated runtime as a subprocess, launched as the agent launches it.

    Its prefix cache is on, as SGLang runs by default; ``prefix_cache=False`` turns it off
    (the simulator's fidelity test, whose prompts repeat the same tokens, compares timings
    with a model that has no cache)."""

    def __init__(
        self,
        tmp_path: Path,
        *extra: str,
        gpus: tuple[int, ...] = (3,),
        prefix_cache: bool = True,
    ) -> None:
        if not prefix_cache:
            extra = (*extra, "--disable-radix-cache")
        model = tmp_path / "model"
        model.mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        spec = LaunchSpec(
            model_path=model,
            served_model_name="tiny-chat",
            host="127.0.0.1",
            port=self.port,
            gpu_indices=gpus,
            gpu_model="NVIDIA L40S",
            extra_args=extra,
        )
        runtime = SimulatedRuntime()
        self.log = (tmp_path / f"server-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            runtime.command(spec),
            env=runtime.environment(spec, os.environ),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(
        tmp_path,
        *("--warmup-s", "0.2", "--max-running-requests", "2", "--speedup", "4"),
        prefix_cache=True,  # as SGLang runs by default
    )
    yield s
    s.stop()


async def until(
    check: Callable[[], Awaitable[bool]], within_s: float = 30.0, what: str = "condition"
) -> None:
    """Poll an async check until it is true; fail after ``within_s``."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        if await check():
            return
        assert asyncio.get_running_loop().time() < deadline, f"{what} not met in {within_s}s"
        await asyncio.sleep(0.05)


async def healthy(url: str, within_s: float = 30.0) -> None:
    client = ServerClient(url)
    try:

        async def ok() -> bool:
            return (await client.health()).ok

        await until(ok, within_s, f"{url} healthy")
    finally:
        await client.close()


async def test_health_is_503_while_warming_up(tmp_path: Path) -> None:
    s = Server(tmp_path, "--warmup-s", "3")
    try:
        async with httpx.AsyncClient(base_url=s.url, timeout=5) as http:
            statuses: list[int] = []

            async def answered() -> bool:
                try:
                    statuses.append((await http.get("/health")).status_code)
                except httpx.TransportError:
                    return False
                return True

            await until(answered, what="an answer on /health")
            assert statuses[-1] == 503
            refused = await http.post("/generate", json={"text": "hi"})
            assert refused.status_code == 503
            await healthy(s.url)
            assert (await http.get("/health_generate")).status_code == 200
    finally:
        s.stop()


async def test_speaks_the_sglang_api(server: Server) -> None:
    await healthy(server.url)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        models = (await http.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["tiny-chat"]
        info = (await http.get("/server_info")).json()
        assert info["served_model_name"] == "tiny-chat"
        assert "model_path" not in info  # sglang-router would try to fetch its tokenizer
        assert info["tp_size"] == 1 and info["max_running_requests"] == 2
        assert info["simulated"]["cuda_visible_devices"] == "3"
        assert info["simulated"]["gpu_profile"] == "L40S"

        generated = (
            await http.post(
                "/generate", json={"input_ids": [1] * 37, "sampling_params": {"max_new_tokens": 9}}
            )
        ).json()
        assert generated["meta_info"]["prompt_tokens"] == 37
        assert generated["meta_info"]["completion_tokens"] == 9
        assert len(generated["text"].split()) == 9

        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12}
        whole = (await http.post("/v1/chat/completions", json=body)).json()
        assert whole["object"] == "chat.completion"
        assert whole["usage"]["completion_tokens"] == 12
        text = whole["choices"][0]["message"]["content"]

        pieces: list[str] = []
        finish = None
        async with http.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True}
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                assert chunk["object"] == "chat.completion.chunk"
                pieces.append(chunk["choices"][0]["delta"]["content"])
                finish = chunk["choices"][0]["finish_reason"] or finish
        assert "".join(pieces) == text and len(pieces) > 1 and finish == "length"

        completion = (
            await http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
        ).json()
        assert completion["object"] == "text_completion"
        assert len(completion["choices"][0]["text"].split()) == 3

        bad = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**6})
        assert bad.status_code == 400 and "context length" in bad.json()["message"]
        assert (await http.post("/generate", content=b"{nope")).status_code == 400

        metrics = (await http.get("/metrics")).text
        for name in (
            "sglang:num_running_reqs",
            "sglang:num_queue_reqs",
            "sglang:token_usage",
            "sglang:gen_throughput",
            "sglang:cache_hit_rate",
            "sglang:time_to_first_token_seconds_bucket",
            "sglang:e2e_request_latency_seconds_count",
        ):
            assert name in metrics, name
        assert 'sglang:time_to_first_token_seconds_count{model_name="tiny-chat"} ' in metrics


async def test_load_shows_running_and_queued_requests(server: Server) -> None:
    await healthy(server.url)
    client = ServerClient(server.url)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        body = {"text": "x" * 400, "sampling_params": {"max_new_tokens": 150}}
        requests = [asyncio.create_task(http.post("/generate", json=body)) for _ in range(5)]
        seen = []

        async def busy() -> bool:
            load = await client.load()
            seen.append(load)
            return load is not None and load.running_requests == 2 and load.queued_requests == 3

        await until(busy, what="2 running and 3 queued")
        load = seen[-1]
        assert load is not None and 0 < load.kv_cache_usage < 1
        from_metrics = parse_metrics((await http.get("/metrics")).text)
        from_loads = parse_loads((await http.get("/v1/loads")).json())
        assert from_metrics.running_requests == from_loads.running_requests == 2
        responses = await asyncio.gather(*requests)
        assert [r.status_code for r in responses] == [200] * 5
        after = await client.load()
        assert after is not None and after.running_requests == after.queued_requests == 0
        assert after.generation_tokens_per_second > 0
    await client.close()


async def test_sigterm_finishes_in_flight_requests_then_exits(server: Server) -> None:
    await healthy(server.url)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        body = {"text": "hello", "sampling_params": {"max_new_tokens": 200}}
        in_flight = [asyncio.create_task(http.post("/generate", json=body)) for _ in range(4)]
        client = ServerClient(server.url)

        async def all_accepted() -> bool:
            load = await client.load()
            return load is not None and load.running_requests + load.queued_requests == 4

        await until(all_accepted, what="4 requests accepted")
        server.proc.send_signal(signal.SIGTERM)

        async def refusing() -> bool:  # the signal has been handled
            return not (await client.health()).ok

        await until(refusing, what="health 503 after SIGTERM")
        late = await http.post("/generate", json=body)
        assert late.status_code == 503
        responses = await asyncio.gather(*in_flight)
        assert [r.status_code for r in responses] == [200] * 4
        assert all(r.json()["meta_info"]["completion_tokens"] == 200 for r in responses)
        await client.close()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, server.proc.wait, 30) == 0


def test_exits_with_a_reason_when_the_model_path_is_missing(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *SimulatedRuntime().command(
                LaunchSpec(tmp_path / "absent", "m", "127.0.0.1", free_port(), (0,))
            )
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "absent does not exist" in result.stderr


async def stream_chat(
    http: httpx.AsyncClient, body: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Stream a chat completion: seconds to the first token, and the usage block."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    first: float | None = None
    usage: dict[str, Any] = {}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None:
                first = loop.time() - started
            usage = json.loads(line[6:]).get("usage") or usage
    assert first is not None
    return first, usage


async def test_a_shared_system_prompt_is_served_from_the_prefix_cache(server: Server) -> None:
    await healthy(server.url)
    system = {"role": "system", "content": "You are a careful assistant. " * 800}  # ~6000 tokens

    def chat(question: str) -> dict[str, Any]:
        user = {"role": "user", "content": question}
        return {"model": "tiny-chat", "messages": [system, user], "max_tokens": 4}

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        first_ttft, first_usage = await stream_chat(http, chat("What is a spillway?"))
        second_ttft, second_usage = await stream_chat(http, chat("And a weir?"))
        assert "prompt_tokens_details" not in first_usage  # nothing was cached yet
        cached = second_usage["prompt_tokens_details"]["cached_tokens"]
        assert 5000 < cached < second_usage["prompt_tokens"] and cached % 64 == 0
        # The first prefills ~6000 tokens (~0.3 s at 4x L40S speed); the second only ~60.
        assert second_ttft < first_ttft / 3, (first_ttft, second_ttft)

        whole = (await http.post("/v1/chat/completions", json=chat("And a dam?"))).json()
        assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] == cached

        metrics = (await http.get("/metrics")).text
        rate = parse_metrics(metrics).cache_hit_rate
        assert 0.4 < rate < 1, metrics
        assert 'sglang:cached_tokens_total{model_name="tiny-chat"} ' + f"{2.0 * cached}" in metrics
        load = parse_loads((await http.get("/v1/loads")).json())
        assert load.cache_hit_rate == pytest.approx(rate)

        text = {"text": "abcd" * 300, "sampling_params": {"max_new_tokens": 2}}
        assert (await http.post("/generate", json=text)).json()["meta_info"]["cached_tokens"] == 0
        again = (await http.post("/generate", json=text)).json()["meta_info"]
        assert again["cached_tokens"] == 256 and again["prompt_tokens"] == 300
    print(f"TTFT first {first_ttft * 1000:.1f} ms, second {second_ttft * 1000:.1f} ms")


async def test_without_the_radix_cache_nothing_is_cached(tmp_path: Path) -> None:
    s = Server(tmp_path, "--warmup-s", "0.2", "--speedup", "4", prefix_cache=False)
    try:
        await healthy(s.url)
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
            body = {"messages": [{"role": "user", "content": "x" * 4000}], "max_tokens": 2}
            for _ in range(2):
                usage = (await http.post("/v1/chat/completions", json=body)).json()["usage"]
                assert "prompt_tokens_details" not in usage
            assert parse_metrics((await http.get("/metrics")).text).cache_hit_rate == 0
    finally:
        s.stop()


def test_prompts_are_tokenised_as_they_are_counted_and_hashed_stably() -> None:
    for text in ("", "abc", "abcd", "abcde", "x" * 1001):
        assert len(text_tokens(text)) == count_tokens(text)
    messages = [{"role": "system", "content": "s" * 300}, {"role": "user", "content": "hi"}]
    assert len(chat_tokens(messages)) == sum(4 + count_tokens(str(m["content"])) for m in messages)
    one = prefix_hashes(chat_tokens(messages), 12)  # 84 tokens, 7 blocks
    other = prefix_hashes(chat_tokens([messages[0], {"role": "user", "content": "yo"}]), 12)
    assert len(one) == 7
    assert one[:-1] == other[:-1] and one[-1] != other[-1]  # only the last block differs
    as_user = prefix_hashes(chat_tokens([{**messages[0], "role": "user"}]), 12)
    assert as_user[0] != one[0]  # the role is part of the prompt
    # Stable across processes: a fixed value, not Python's salted hash().
    assert prefix_hashes(text_tokens("spillway" * 8), 16) == [0x7F2908605F9DC2D5]


def test_server_info_reports_the_model_path_only_when_asked(tmp_path: Path) -> None:
    base = ["--model-path", str(tmp_path)]
    for extra, reported in (([], False), (["--report-model-path"], True)):
        args = parse_args([*base, *extra])
        info = SimulatedServer(args, make_profile(args)).server_args()
        assert ("model_path" in info) is reported


class InProcess:
    """The simulated server in this process, so a test can watch its model."""

    def __init__(self, server: SimulatedServer, port: int) -> None:
        self.server = server
        self.port = port
        self.cancels: list[tuple[str, bool]] = []  # (request id, whether it was still live)


@pytest.fixture
async def inproc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[InProcess]:
    port = free_port()
    flags = ["--port", str(port), "--warmup-s", "0", "--gpu-model", "NVIDIA L40S"]
    args = parse_args(["--model-path", str(tmp_path), *flags])
    server = SimulatedServer(args, make_profile(args))
    watched = InProcess(server, port)
    cancel = server.model.cancel

    def recording_cancel(request_id: str) -> bool:
        live = cancel(request_id)
        watched.cancels.append((request_id, live))
        return live

    monkeypatch.setattr(server.model, "cancel", recording_cancel)
    runner = make_runner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    engine = asyncio.create_task(server._engine())
    yield watched
    engine.cancel()
    await runner.cleanup()


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
async def test_a_client_that_goes_away_cancels_its_request(
    inproc: InProcess, stream: bool, phase: str
) -> None:
    server = inproc.server
    # At L40S speed 20,000 prompt tokens take ~4 s to prefill; 5,000 new ones ~2 min to decode.
    content = "x" * 80_000 if phase == "prefill" else "hello"
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 5000}
    payload = json.dumps({**body, "stream": stream}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", inproc.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()

    async def accepted() -> bool:
        return len(server.pending) == 1

    await until(accepted, 5, "the request accepted")
    (rid,) = server.pending
    if phase == "decode":

        async def decoding() -> bool:
            return rid in server._last_token  # its first token has come

        await until(decoding, 5, "the first token")
        if stream:
            assert b"data: " in await reader.readuntil(b"data: ")
    else:
        await asyncio.sleep(0.3)
        assert rid not in server._last_token and server.model.in_flight == 1
    writer.close()
    await writer.wait_closed()

    async def cancelled() -> bool:
        return (rid, True) in inproc.cancels

    await until(cancelled, 2, "the model to see the cancel")
    assert server.model.in_flight == 0 and not server.pending
    stats = server.model.stats(time.monotonic())
    assert stats.running == stats.queued == stats.used_tokens == 0
