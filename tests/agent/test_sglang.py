"""The ``sglang`` runtime: its launch command everywhere, and a real SGLang where a GPU is."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import httpx
import pytest

from agent.gpus import NvmlInventory
from agent.runtimes import LaunchSpec, SGLangRuntime
from agent.runtimes.base import ServerClient, parse_loads, parse_metrics
from agent.status import ReplicaState
from agent.supervisor import ReplicaSpec, Supervisor, SupervisorSettings


def test_launch_command_follows_the_spec() -> None:
    spec = LaunchSpec(
        model_path=Path("/models/llama-3.1-8b"),
        served_model_name="llama",
        host="0.0.0.0",
        port=30007,
        gpu_indices=(4, 5),
        mem_fraction_static=0.85,
        extra_args=("--context-length", "8192"),
    )
    runtime = SGLangRuntime(python="/opt/venv/bin/python")
    assert runtime.command(spec) == [
        "/opt/venv/bin/python",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "/models/llama-3.1-8b",
        "--served-model-name",
        "llama",
        "--host",
        "0.0.0.0",
        "--port",
        "30007",
        "--tp-size",
        "2",
        "--enable-metrics",
        "--mem-fraction-static",
        "0.85",
        "--context-length",
        "8192",
    ]
    env = runtime.environment(spec, {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert env == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "4,5"}
    with pytest.raises(ValueError, match="at least one GPU"):
        runtime.command(LaunchSpec(Path("/m"), "m", "h", 1, ()))
    keyed = runtime.command(LaunchSpec(Path("/m"), "m", "h", 1, (0,), api_key="k-1"))
    assert keyed[keyed.index("--api-key") + 1] == "k-1"


def test_load_readers_sum_data_parallel_ranks() -> None:
    load = parse_loads(
        {
            "loads": [
                {
                    "num_running_reqs": 3,
                    "num_waiting_reqs": 1,
                    "token_usage": 0.2,
                    "gen_throughput": 100.0,
                    "cache_hit_rate": 0.5,
                },
                {
                    "num_running_reqs": 2,
                    "num_waiting_reqs": 4,
                    "token_usage": 0.4,
                    "gen_throughput": 50.0,
                    "cache_hit_rate": 0.3,
                },
            ]
        }
    )
    assert (load.running_requests, load.queued_requests) == (5, 5)
    assert load.kv_cache_usage == pytest.approx(0.3)
    assert load.generation_tokens_per_second == pytest.approx(150.0)
    metrics = parse_metrics(
        "# HELP sglang:num_running_reqs x\n"
        'sglang:num_running_reqs{model_name="m",tp_rank="0"} 7.0\n'
        'sglang:num_queue_reqs{model_name="m",tp_rank="0"} 2.0\n'
        'sglang:token_usage{model_name="m",tp_rank="0"} 1.7\n'
        'sglang:gen_throughput{model_name="m",tp_rank="0"} 321.5\n'
    )
    assert (metrics.running_requests, metrics.queued_requests) == (7, 2)
    assert metrics.kv_cache_usage == 1.0  # clamped
    assert metrics.generation_tokens_per_second == pytest.approx(321.5)
    with pytest.raises(ValueError, match="'loads' list"):
        parse_loads({"nothing": []})


def _real_sglang_missing() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi is not installed"
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed"
    if not os.environ.get("SPILLWAY_TEST_SGLANG_MODEL"):
        return "SPILLWAY_TEST_SGLANG_MODEL (a local model directory) is not set"
    return None


@pytest.mark.gpu
@pytest.mark.timeout(1200)
@pytest.mark.skipif(_real_sglang_missing() is not None, reason=str(_real_sglang_missing()))
async def test_real_sglang_starts_serves_reports_and_drains(tmp_path: Path) -> None:
    inventory = NvmlInventory.open()
    try:
        supervisor = Supervisor(
            SupervisorSettings(state_dir=tmp_path, default_runtime="sglang", health_interval_s=1.0),
            inventory.gpus,
        )
        model = os.environ["SPILLWAY_TEST_SGLANG_MODEL"]
        status = supervisor.start(ReplicaSpec("real", "smoke", model, gpu_indices=(0,)))
        try:
            status = await supervisor.wait_healthy("real", timeout_s=900)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{status.port}", timeout=120
            ) as http:
                body = {
                    "text": "The capital of France is",
                    "sampling_params": {"max_new_tokens": 8},
                }
                answer = (await http.post("/generate", json=body)).json()
                assert answer["meta_info"]["completion_tokens"] > 0
                assert (await http.get("/v1/models")).json()["data"]
            assert supervisor.status("real").state is ReplicaState.HEALTHY
            drained = await supervisor.drain("real", timeout_s=120)
            assert drained.state is ReplicaState.STOPPED
        finally:
            await supervisor.close(stop_replicas=True)
    finally:
        inventory.close()


async def test_the_running_cap_is_read_from_loads_metrics_or_server_info_once() -> None:
    from agent.runtimes.base import parse_max_running

    ranks = [{"num_running_reqs": 1, "max_running_requests": 48}] * 2
    assert parse_loads({"loads": ranks}).max_running_requests == 96
    assert parse_loads({"loads": [{"num_running_reqs": 1}]}).max_running_requests == 0
    assert parse_metrics('sglang:max_running_requests{m="x"} 32.0\n').max_running_requests == 32
    assert parse_max_running({"max_running_requests": 128}) == 128
    assert parse_max_running({"max_running_requests": None, "internal_states": [{}]}) == 0
    states = [{"max_running_requests": 20}, {"max_running_requests": 20}]
    assert parse_max_running({"max_running_requests": None, "internal_states": states}) == 40

    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path == "/v1/loads":
            return httpx.Response(200, json={"loads": [{"num_running_reqs": 2}]})
        if request.url.path == "/server_info":
            return httpx.Response(200, json={"max_running_requests": 256})
        return httpx.Response(404)

    client = ServerClient("http://replica")
    await client.close()
    client._client = httpx.AsyncClient(
        base_url="http://replica", transport=httpx.MockTransport(answer)
    )
    try:
        loads = [await client.load() for _ in range(3)]
    finally:
        await client.close()
    assert [load.max_running_requests if load else -1 for load in loads] == [256, 256, 256]
    assert asked.count("/server_info") == 1  # once per client, that is once per launch
