"""gateway.yaml: its errors name the file and line; the documented examples are valid; and
``spillway gateway run`` serves, routes and stops on SIGTERM as a real process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from common.configfile import ConfigError
from decisions.endpoints import GatewayRouting, ManagedEndpoint
from gateway.config import ENV_PREFIX, GatewayConfig, load_gateway_config
from tests.conftest import write_yaml
from tests.gateway.conftest import (
    MODEL,
    ROOT,
    FakeScheduler,
    ReplicaFactory,
    deployment,
    free_port,
    routable,
)


def _config(tmp_path: Path, **fields: object) -> Path:
    data = {
        "gateway_id": "gw-1",
        "policy_file": "policy.yaml",
        "scheduler": {"address": "127.0.0.1:50051", "token_file": "gw.token"},
        **fields,
    }
    return write_yaml(tmp_path / "gateway.yaml", data)


def test_config_paths_are_relative_to_the_file_and_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config(tmp_path)
    monkeypatch.setenv(ENV_PREFIX + "SCHEDULER__ADDRESS", "scheduler.internal:6000")
    monkeypatch.setenv(ENV_PREFIX + "LISTEN", "127.0.0.1:0")
    config = load_gateway_config(path)
    assert config.policy_file == tmp_path.resolve() / "policy.yaml"
    assert config.scheduler.token_file == tmp_path.resolve() / "gw.token"
    assert config.scheduler.address == "scheduler.internal:6000"
    assert config.host_port == ("127.0.0.1", 0)


def test_config_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = _config(tmp_path, listen="nowhere", conect_timeout_s=3)
    with pytest.raises(ConfigError) as caught:
        load_gateway_config(path)
    text = str(caught.value)
    assert re.search(rf"{re.escape(str(path))}:\d+: listen: expected host:port", text)
    assert "conect_timeout_s: unknown field" in text


def test_the_documented_examples_are_valid() -> None:
    config = load_gateway_config(ROOT / "examples" / "gateway.yaml")
    assert config.gateway_id == "gw-eu-1" and config.policy_file.exists()
    readme = (ROOT / "README.md").read_text()
    blocks = {
        b.split("\n", 1)[0]: yaml.safe_load(b)
        for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)
    }
    GatewayConfig.model_validate(blocks["# gateway.yaml"])
    traffic = blocks["# policy.yaml (a deployment's traffic sections)"]
    for endpoint in traffic["managed"]:
        ManagedEndpoint.model_validate(endpoint)
    GatewayRouting.model_validate(traffic["gateway"])


async def test_spillway_gateway_run_serves_and_stops_on_sigterm(
    tmp_path: Path, replicas: ReplicaFactory, scheduler: FakeScheduler
) -> None:
    (replica,) = await replicas("r-eu-0", extra=("--speedup", "50"))
    scheduler.set_fleet([routable(replica)])
    write_yaml(tmp_path / "policy.yaml", {"deployments": {"chat": deployment()}})
    (tmp_path / "gw.token").write_text(scheduler.token + "\n")
    port = free_port()
    path = _config(
        tmp_path,
        listen=f"127.0.0.1:{port}",
        scheduler={"address": f"127.0.0.1:{scheduler.port}", "token_file": "gw.token"},
    )
    log = (tmp_path / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spillway",
        "gateway",
        "run",
        "--config",
        str(path),
        cwd=ROOT,
        stdout=log,
        stderr=log,
        env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with http.get(url + "/health") as r:
                        if (await r.json())["replicas"] == 1:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.returncode is None, (tmp_path / "gateway.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
                await asyncio.sleep(0.05)
            async with http.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200 and r.headers["x-spillway-target"] == "r-eu-0"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def test_a_missing_token_file_is_bad_input(tmp_path: Path) -> None:
    write_yaml(tmp_path / "policy.yaml", {"deployments": {"chat": deployment()}})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spillway",
        "gateway",
        "run",
        "--config",
        str(_config(tmp_path)),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"gw.token" in err and b"bearer token" in err
