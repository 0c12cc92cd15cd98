"""The simulated runtime as a real process speaking SGLang's HTTP API on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agent.runtimes import LaunchSpec, ServerClient, SimulatedRuntime
from agent.runtimes.base import parse_loads, parse_metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    def __init__(self, tmp_path: Path, *extra: str, gpus: tuple[int, ...] = (3,)) -> None:
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
    s = Server(tmp_path, "--warmup-s", "0.2", "--max-running-requests", "2", "--speedup", "4")
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
