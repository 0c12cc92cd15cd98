"""Start-up failures of real ``spillway`` processes: one line on stderr and exit 2, never a
traceback. And two real agent processes with one id: one reports, the other is refused."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.server import Scheduler
from tests.conftest import SchedulerFactory, Tokens, eventually, write_yaml
from tests.gateway.conftest import deployment

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def held_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port some other process is listening on for the duration of the block."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        sock.listen()
        yield sock.getsockname()[1]


def spillway(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spillway", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("spillway: error: ")
    return lines[0]


def _scheduler(tmp_path: Path, tokens: Tokens, **fields: Any) -> str:
    config = {"tokens_file": str(tokens.path), "metrics_listen": None, **fields}
    return str(write_yaml(tmp_path / "scheduler.yaml", config))


def test_the_grpc_port_in_use(tmp_path: Path, tokens: Tokens) -> None:
    with held_port() as port:
        line = _one_line(
            spillway(
                "scheduler",
                "run",
                "--config",
                _scheduler(tmp_path, tokens, listen=f"127.0.0.1:{port}"),
            )
        )
    assert line == (
        f"spillway: error: cannot listen on 127.0.0.1:{port} (listen): the address is already in "
        "use (another process holds the port)"
    )


def test_the_metrics_port_in_use(tmp_path: Path, tokens: Tokens) -> None:
    with held_port() as port:
        config = _scheduler(
            tmp_path, tokens, listen="127.0.0.1:0", metrics_listen=f"127.0.0.1:{port}"
        )
        line = _one_line(spillway("scheduler", "run", "--config", config))
    assert f"cannot listen on 127.0.0.1:{port} (metrics_listen): the address is already" in line


@pytest.mark.parametrize("grpc_host", ["127.0.0.1", "0.0.0.0"])
def test_grpc_and_metrics_on_the_same_port(tmp_path: Path, tokens: Tokens, grpc_host: str) -> None:
    with held_port() as port:
        pass  # a port that was free a moment ago
    config = _scheduler(
        tmp_path, tokens, listen=f"{grpc_host}:{port}", metrics_listen=f"127.0.0.1:{port}"
    )
    line = _one_line(spillway("scheduler", "run", "--config", config))
    assert f"metrics_listen: the same address as listen ({grpc_host}:{port})" in line
    assert line.startswith(f"spillway: error: {config}:")


def test_an_empty_tokens_file_at_start(tmp_path: Path, tokens: Tokens) -> None:
    tokens.path.write_text("")
    line = _one_line(spillway("scheduler", "run", "--config", _scheduler(tmp_path, tokens)))
    assert line == (
        f"spillway: error: {tokens.path}: no tokens: the file is empty (spillway token new "
        f"--tokens-file {tokens.path} writes the first)"
    )


def test_a_binary_tokens_file_at_start(tmp_path: Path, tokens: Tokens) -> None:
    tokens.path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    line = _one_line(spillway("scheduler", "run", "--config", _scheduler(tmp_path, tokens)))
    assert f"{tokens.path}:1: not UTF-8 text" in line


def test_the_gateway_listen_port_in_use(tmp_path: Path, tokens: Tokens) -> None:
    tokens.add("gw-1", "gateway")
    token = tokens.write("gw-1", tmp_path)
    policy = write_yaml(tmp_path / "policy.yaml", {"deployments": {"chat": deployment()}})
    with held_port() as port:
        config = write_yaml(
            tmp_path / "gateway.yaml",
            {
                "gateway_id": "gw-1",
                "listen": f"127.0.0.1:{port}",
                "policy_file": str(policy),
                "scheduler": {"address": "127.0.0.1:1", "token_file": str(token)},
            },
        )
        line = _one_line(spillway("gateway", "run", "--config", str(config)))
    assert line == (
        f"spillway: error: cannot listen on 127.0.0.1:{port} (listen): the address is already in "
        "use (another process holds the port)"
    )


# -- two agent processes, one id ------------------------------------------------------------------


def _agent(tmp_path: Path, scheduler: Scheduler, token: Path, name: str) -> subprocess.Popen[bytes]:
    config = write_yaml(
        tmp_path / f"{name}.yaml",
        {
            "agent_id": "node-a",
            "scheduler": {"address": f"127.0.0.1:{scheduler.port}", "token_file": str(token)},
            "labels": {"pool": "reserved-eu", "provider": "onprem", "region": "eu-frankfurt"},
            "gpus": {
                "discovery": "static",
                "static": [{"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": 2}],
            },
            "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.3},
        },
    )
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "spillway", "agent", "run", "--config", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def test_two_agent_processes_with_one_id_never_take_turns(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = await start_scheduler()
    token = tokens.write("node-a", tmp_path)
    streams = scheduler.service.streams
    first = _agent(tmp_path, scheduler, token, "first")
    second: subprocess.Popen[bytes] | None = None
    try:
        await eventually(lambda: streams.report_stream("node-a") is not None, within_s=20)
        holder = streams.report_stream("node-a")
        assert holder is not None
        second = _agent(tmp_path, scheduler, token, "second")
        await eventually(
            lambda: "ALREADY_EXISTS" in (tmp_path / "second.log").read_text(), within_s=20
        )
        record = scheduler.fleet.get("node-a")
        assert record is not None
        before = record.reports_received
        for _ in range(10):  # 2 s of the second retrying every 0.3 s at most
            assert streams.report_stream("node-a") is holder
            await asyncio.sleep(0.2)
        assert scheduler.fleet.get("node-a").reports_received >= before + 8  # type: ignore[union-attr]
        assert "ALREADY_EXISTS" not in (tmp_path / "first.log").read_text()
        # The first stops: the second takes the id over.
        first.terminate()
        first.wait(15)
        await eventually(
            lambda: (
                (s := streams.report_stream("node-a")) is not None and s.instance != holder.instance
            ),
            within_s=5,
        )
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


# -- a lost race: the probe passed, then the bind failed ------------------------------------------


@pytest.mark.parametrize("which", ["listen", "metrics_listen"])
async def test_a_bind_that_fails_after_the_probe_leaves_nothing_running(
    tokens: Tokens, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    from common.configfile import InputError
    from scheduler import server
    from tests.conftest import scheduler_config

    monkeypatch.setattr(server, "check_can_listen", lambda address, field: None)
    with held_port() as port:
        fields = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}
        fields[which] = f"127.0.0.1:{port}"
        scheduler = Scheduler(scheduler_config(tokens.path, **fields))
        with pytest.raises(InputError) as caught:
            await scheduler.start()
    assert str(caught.value).startswith(f"cannot listen on 127.0.0.1:{port} ({which}): ")
    assert "\n" not in str(caught.value)
    assert scheduler._tasks == [] and scheduler._metrics_server is None
    if which == "metrics_listen":  # the gRPC server had started: it is stopped again
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", scheduler.port))
