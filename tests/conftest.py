"""Shared fixtures: token files, agent configs, schedulers serving real gRPC on loopback, a
real Temporal dev server, and moto as a real HTTP server with fake AWS credentials."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import AgentConfig
from scheduler.auth import add_token
from scheduler.config import SchedulerConfig
from scheduler.server import Scheduler


class Tokens:
    """A tokens file plus the clear-text tokens the test hands out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clear: dict[str, str] = {}

    def add(self, principal: str, role: str = "agent") -> str:
        token = add_token(self.path, principal, role)  # type: ignore[arg-type]
        self.clear[principal] = token
        return token

    def write(self, principal: str, directory: Path) -> Path:
        path = directory / f"{principal}.token"
        path.write_text(self.clear[principal] + "\n")
        return path


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    store = Tokens(tmp_path / "tokens.yaml")
    for agent_id in ("node-a", "node-b"):
        store.add(agent_id)
    store.add("oncall", "operator")
    return store


def scheduler_config(tokens_file: Path, **overrides: Any) -> SchedulerConfig:
    fields: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": None,
        "tokens_file": tokens_file,
        "report_interval_s": 0.2,
        "stale_after_intervals": 3,
        "gone_after_intervals": 6,
    }
    fields.update(overrides)
    return SchedulerConfig(**fields)


SchedulerFactory = Callable[..., Awaitable[Scheduler]]


@pytest.fixture
async def start_scheduler(tokens: Tokens) -> AsyncIterator[SchedulerFactory]:
    """Start in-process schedulers; every one is stopped when the test ends."""
    started: list[Scheduler] = []

    async def start(**overrides: Any) -> Scheduler:
        scheduler = Scheduler(scheduler_config(tokens.path, **overrides))
        await scheduler.start()
        started.append(scheduler)
        return scheduler

    yield start
    for scheduler in started:
        await scheduler.stop(grace=0)


def agent_config(
    agent_id: str, address: str, token_file: Path, gpus: int = 8, **extra: Any
) -> AgentConfig:
    fields: dict[str, Any] = {
        "agent_id": agent_id,
        "scheduler": {"address": address, "token_file": token_file},
        "labels": {
            "pool": "reserved-eu",
            "provider": "onprem",
            "region": "eu-frankfurt",
            "residency_group": "eu",
        },
        "gpus": {
            "discovery": "static",
            "static": [{"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": gpus}],
        },
        "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
    }
    fields.update(extra)
    return AgentConfig.model_validate(fields)


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def eventually(
    check: Callable[[], object], within_s: float = 5.0, interval: float = 0.02
) -> float:
    """Wait until ``check()`` is truthy; return the seconds it took. Fails after ``within_s``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within_s:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


@pytest.fixture(scope="session")
def temporal_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a real Temporal dev server shared by the whole test session."""
    from tests.temporal import TemporalDevServer

    server = TemporalDevServer(tmp_path_factory.mktemp("temporal"))
    try:
        server.wait_ready()
        yield server.address
    finally:
        server.stop()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
