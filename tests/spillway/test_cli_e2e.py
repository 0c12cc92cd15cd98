"""The commands an operator runs, as real processes: scheduler, agents, status, tokens, demo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import write_yaml

INTERVAL_S = 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spillway(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spillway", *args], capture_output=True, text=True, timeout=timeout
    )


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tokens = root / "tokens.yaml"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.secrets: list[str] = []
        for agent_id in ("node-a", "node-b"):
            result = spillway(
                "token",
                "new",
                "--id",
                agent_id,
                "--tokens-file",
                str(self.tokens),
                "--out",
                str(root / f"{agent_id}.token"),
            )
            assert result.returncode == 0, result.stderr
            self.secrets.append((root / f"{agent_id}.token").read_text().strip())
        result = spillway(
            "token",
            "new",
            "--id",
            "oncall",
            "--role",
            "operator",
            "--tokens-file",
            str(self.tokens),
        )
        assert result.returncode == 0, result.stderr
        self.operator_token = root / "oncall.token"
        self.operator_token.write_text(result.stdout)
        self.secrets.append(result.stdout.strip())
        self.scheduler_config = write_yaml(
            root / "scheduler.yaml",
            {
                "listen": self.address,
                "metrics_listen": None,
                "tokens_file": "tokens.yaml",
                "report_interval_s": INTERVAL_S,
                "stale_after_intervals": 3,
                "gone_after_intervals": 10,
            },
        )

    def start(self, name: str, *args: str) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "spillway", *args], stdout=log, stderr=subprocess.STDOUT
        )

    def start_scheduler(self) -> None:
        self.start("scheduler", "scheduler", "run", "--config", str(self.scheduler_config))

    def start_agent(self, agent_id: str, gpus: int) -> None:
        config = write_yaml(
            self.root / f"{agent_id}.yaml",
            {
                "agent_id": agent_id,
                "scheduler": {"address": self.address, "token_file": f"{agent_id}.token"},
                "labels": {"pool": "reserved-eu", "provider": "onprem", "region": "eu-frankfurt"},
                "gpus": {
                    "discovery": "auto",
                    "static": [{"model": "NVIDIA A100-SXM4-80GB", "memory_gib": 80, "count": gpus}],
                },
                "reconnect": {"initial_backoff_s": 0.2, "max_backoff_s": 5},
            },
        )
        self.start(agent_id, "agent", "run", "--config", str(config))

    def wait_serving(self, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic()
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("scheduler never served")
                time.sleep(0.02)

    def status_json(self) -> dict[str, Any]:
        result = spillway(
            "status",
            "--scheduler",
            self.address,
            "--token-file",
            str(self.operator_token),
            "--json",
        )
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        return proc.wait(15)

    def logs(self) -> str:
        return "".join(p.read_text() for p in self.root.glob("*.log"))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    for proc in c.procs.values():
        proc.kill()
        proc.wait()


def _reported_agents(fleet: dict[str, Any], after: float = 0.0) -> set[str]:
    seen = set()
    for agent in fleet.get("agents", []):
        at = agent.get("last_report_at")
        if at and _parse_time(at) > after:
            seen.add(agent["registration"]["agent_id"])
    return seen


def _parse_time(text: str) -> float:
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromJsonString(text)
    return ts.ToNanoseconds() / 1e9


def test_fleet_survives_a_scheduler_crash(cluster: Cluster) -> None:
    cluster.start_scheduler()
    cluster.wait_serving()
    cluster.start_agent("node-a", 8)
    cluster.start_agent("node-b", 2)
    deadline = time.monotonic() + 30
    while _reported_agents(fleet := cluster.status_json()) != {"node-a", "node-b"}:
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.2)
    by_id = {a["registration"]["agent_id"]: a for a in fleet["agents"]}
    assert len(by_id["node-a"]["registration"]["gpus"]) == 8
    assert by_id["node-b"]["registration"]["gpu_source"] == "static"
    assert by_id["node-b"]["health"] == "AGENT_HEALTH_CONNECTED"

    table = spillway(
        "status", "--scheduler", cluster.address, "--token-file", str(cluster.operator_token)
    )
    assert table.returncode == 0, table.stderr
    assert "node-a" in table.stdout and "node-b" in table.stdout
    assert "8/8" in table.stdout and "2/2" in table.stdout

    # Crash the scheduler (no graceful shutdown), restart it on the same port.
    assert cluster.stop("scheduler", signal.SIGKILL) == -signal.SIGKILL
    time.sleep(INTERVAL_S)
    cluster.start_scheduler()
    serving_at = cluster.wait_serving()
    serving_wall = time.time()
    while _reported_agents(fleet := cluster.status_json(), after=serving_wall - 0.5) != {
        "node-a",
        "node-b",
    }:
        assert time.monotonic() - serving_at < 10, cluster.logs()
        time.sleep(0.05)
    rebuilt = time.monotonic() - serving_at
    # `spillway status` itself takes part of that time; the agents had two intervals.
    assert rebuilt < 2 * INTERVAL_S + 1.0, f"rebuilt in {rebuilt:.2f}s"

    assert cluster.stop("node-a") == 0
    assert cluster.stop("node-b") == 0
    assert cluster.stop("scheduler") == 0
    logs = cluster.logs()
    assert "registered with scheduler" in logs
    for secret in cluster.secrets:
        assert secret not in logs


def test_status_reports_an_unreachable_scheduler(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("spw_x\n")
    result = spillway(
        "status", "--scheduler", f"127.0.0.1:{_free_port()}", "--token-file", str(token)
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_bad_scheduler_config_exits_2(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "scheduler.yaml",
        {
            "tokens_file": "tokens.yaml",
            "stale_after_intervals": 5,
            "gone_after_intervals": 2,
        },
    )
    result = spillway("scheduler", "run", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"spillway: error: {config}:1: (top level): "
        "gone_after_intervals must be greater than stale_after_intervals"
    )


@pytest.mark.skipif(os.environ.get("SPILLWAY_SKIP_DEMO") == "1", reason="SPILLWAY_SKIP_DEMO=1")
@pytest.mark.timeout(300)
def test_demo_spills_out_and_back_and_stops_cleanly() -> None:
    result = spillway("demo", "--seconds", "240", timeout=280)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "spilled out: chat-eu, summarize; rented machines left: 0" in out
    assert "stopped cleanly: scheduler exit 0, reserved-eu-1 exit 0, reserved-us-1 exit 0" in out
    # The workflows' account: reserved GPU first, then rented inside the lock, then back.
    assert "free reserved GPUs: 1 on reserved-us-1" in out
    assert "cheapest allowed offer inside residency group 'eu'" in out
    assert "machine terminated" in out
    assert "Temporal UI: http://127.0.0.1:" in out
