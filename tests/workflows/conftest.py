"""A whole control plane on loopback for workflow tests.

A real Temporal dev server (session-wide), the scheduler's gRPC server and the control plane in
the test's event loop, reserved agents as real ``spillway agent run`` processes with the
simulated runtime and a node worker, machines rented from EC2 on a real moto server and stood
in for by local agent processes, and chat load sent to the replicas over HTTP.

Every test gets its own task queue and deployment names, and everything it started (workflows,
processes, machines) is stopped when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from decisions.fleetview import ReplicaState
from scheduler.config import SchedulerConfig
from scheduler.fleet import AgentHealth
from scheduler.server import Scheduler
from spillway.serve.control_plane import ControlHost, start_control_plane
from tests.conftest import Tokens, write_yaml
from workflows.deployment import workflow_id
from workflows.sweeper import SWEEPER_ID


def ec2_instances(moto_server: str, region: str, key_prefix: str) -> list[dict[str, Any]]:
    """Live EC2 instances whose idempotency-key tag starts with ``key_prefix``."""
    import boto3

    client = boto3.client("ec2", region_name=region, endpoint_url=moto_server)
    found = []
    for reservation in client.describe_instances()["Reservations"]:
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            key = tags.get("spillway:key", "")
            if key.startswith(key_prefix) and instance["State"]["Name"] not in (
                "terminated",
                "shutting-down",
            ):
                found.append({"key": key, "id": instance["InstanceId"], **instance})
    return found


def agent_yaml(
    path: Path,
    agent_id: str,
    scheduler_address: str,
    token_file: Path,
    temporal_address: str,
    *,
    pool: str,
    gpus: int,
    replicas: list[dict[str, Any]] | None = None,
) -> Path:
    return write_yaml(
        path,
        {
            "agent_id": agent_id,
            "scheduler": {"address": scheduler_address, "token_file": str(token_file)},
            "labels": {
                "pool": pool,
                "provider": "onprem",
                "region": "eu-frankfurt",
                "residency_group": "eu",
            },
            "gpus": {
                "discovery": "static",
                "static": [{"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": gpus}],
            },
            "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
            "state_dir": str(path.parent / f"{agent_id}-state"),
            "runtime": STAND_IN_RUNTIME,
            "replicas": replicas or [],
            "temporal": {"address": temporal_address},
        },
    )


#: How every test agent runs replicas: simulated, fast health checks, stopped with the agent.
STAND_IN_RUNTIME: dict[str, Any] = {
    "default": "simulated",
    "host": "127.0.0.1",
    "port_range": [31000, 31999],
    "health_interval_s": 0.2,
    "start_timeout_s": 60,
    "stop_timeout_s": 5,
    "drain_timeout_s": 10,
    "on_exit": "stop",
}


async def eventually_async(
    check: Callable[[], Awaitable[bool]], within_s: float = 10.0, interval: float = 0.1
) -> float:
    """Like :func:`tests.conftest.eventually` for an async check."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within_s:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


class Load:
    """Concurrent /generate requests to every healthy replica of a deployment."""

    def __init__(self, scheduler: Scheduler, deployment: str, per_replica: int) -> None:
        self.scheduler = scheduler
        self.deployment = deployment
        self.per_replica = per_replica
        self._tasks: list[asyncio.Task[None]] = []
        self.sent = 0

    def ports(self) -> list[int]:
        out = []
        for record, health in self.scheduler.fleet.agents():
            if health is not AgentHealth.CONNECTED or record.report is None:
                continue
            for r in record.report.replicas:
                if r.deployment == self.deployment and r.state is ReplicaState.HEALTHY:
                    out.append(r.port)
        return out

    def start(self, ports: list[int] | None = None) -> None:
        for port in ports if ports is not None else self.ports():
            for _ in range(self.per_replica):
                self._tasks.append(asyncio.create_task(self._client(port)))

    async def _client(self, port: int) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            while True:
                try:
                    await client.post(
                        f"http://127.0.0.1:{port}/generate",
                        json={"text": "hello " * 50, "sampling_params": {"max_new_tokens": 64}},
                    )
                    self.sent += 1
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


class ControlPlaneHarness:
    """Builds and tears down one control plane; see the module docstring."""

    def __init__(self, tmp: Path, tokens: Tokens, temporal_address: str) -> None:
        self.tmp = tmp
        self.tokens = tokens
        self.temporal_address = temporal_address
        self.suffix = uuid.uuid4().hex[:6]
        self.task_queue = f"control-{self.suffix}"
        self.scheduler: Scheduler | None = None
        self.host: ControlHost | None = None
        self.watch: asyncio.Task[None] | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        self.loads: list[Load] = []
        self.policy_path = tmp / "policy.yaml"

    def name(self, deployment: str) -> str:
        """A deployment name unique to this test."""
        return f"{deployment}-{self.suffix}"

    def write_policy(self, policy: dict[str, Any]) -> Path:
        return write_yaml(self.policy_path, policy)

    async def start(self, *, moto_server: str | None = None, **spill: Any) -> ControlHost:
        fields: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "metrics_listen": None,
            "tokens_file": self.tokens.path,
            "report_interval_s": 0.25,
            "stale_after_intervals": 4,
            "gone_after_intervals": 12,
            "policy_file": self.policy_path,
            "policy_reload_every_s": 0.2,
            "temporal": {"address": self.temporal_address, "task_queue": self.task_queue},
            "spill": {
                "weights_dir": str(self.tmp / "weights"),
                "register_timeout_s": 60,
                "start_timeout_s": 60,
                "prefetch_timeout_s": 60,
                "drain_timeout_s": 15,
                "heartbeat_timeout_s": 5,
                "failure_backoff_s": 2,
                "sweep_every_s": 1,
                "leak_grace_s": 3,
                **spill,
            },
        }
        if moto_server is not None:
            fields["clouds"] = {"aws": {"image": "ami-12c6146b", "endpoint_url": moto_server}}
            fields["stand_in"] = {
                "state_dir": str(self.tmp / "machines"),
                "agent_settings": {
                    "runtime": STAND_IN_RUNTIME,
                    "temporal": {"address": self.temporal_address},
                    "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
                },
            }
        config = SchedulerConfig.model_validate(fields)
        self.scheduler = Scheduler(config)
        await self.scheduler.start()
        self.host, store = await start_control_plane(
            config, self.scheduler.fleet, f"127.0.0.1:{self.scheduler.port}"
        )
        self.store = store
        self.watch = asyncio.create_task(store.watch(config.policy_reload_every_s))
        return self.host

    @property
    def address(self) -> str:
        assert self.scheduler is not None
        return f"127.0.0.1:{self.scheduler.port}"

    def start_agent(
        self, agent_id: str, *, pool: str, gpus: int, replicas: list[dict[str, Any]] | None = None
    ) -> subprocess.Popen[bytes]:
        self.tokens.add(agent_id)
        config = agent_yaml(
            self.tmp / f"{agent_id}.yaml",
            agent_id,
            self.address,
            self.tokens.write(agent_id, self.tmp),
            self.temporal_address,
            pool=pool,
            gpus=gpus,
            replicas=replicas,
        )
        log = (self.tmp / f"{agent_id}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "spillway", "agent", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.agents.append(process)
        return process

    def load(self, deployment: str, per_replica: int) -> Load:
        assert self.scheduler is not None
        load = Load(self.scheduler, deployment, per_replica)
        self.loads.append(load)
        return load

    def replicas(
        self, deployment: str, state: ReplicaState | None = ReplicaState.HEALTHY
    ) -> list[tuple[str, str]]:
        """(agent id, replica id) of the deployment's replicas in ``state`` (None: any)."""
        assert self.scheduler is not None
        out = []
        for record, _ in self.scheduler.fleet.agents():
            if record.report is None:
                continue
            for r in record.report.replicas:
                if r.deployment == deployment and (state is None or r.state is state):
                    out.append((record.agent_id, r.replica_id))
        return out

    async def client(self) -> Client:
        assert self.host is not None
        return self.host.client

    async def close(self) -> None:
        for load in self.loads:
            await load.stop()
        if self.watch is not None:
            self.watch.cancel()
        if self.host is not None:
            client = self.host.client
            # By id first: the visibility store behind list_workflows may lag.
            fixed = [SWEEPER_ID, *(workflow_id(n) for n in self.store.policy.deployments)]
            for wid in fixed:
                with contextlib.suppress(Exception):
                    await client.get_workflow_handle(wid).terminate("test over")
            async for wf in client.list_workflows(f'TaskQueue="{self.task_queue}"'):
                if wf.status == WorkflowExecutionStatus.RUNNING:
                    with contextlib.suppress(Exception):
                        await client.get_workflow_handle(wf.id, run_id=wf.run_id).terminate(
                            "test over"
                        )
            await self.host.stop()
            for provider in self.host.plane.providers.values():
                for instance in await asyncio.to_thread(provider.list_managed):
                    await asyncio.to_thread(provider.terminate, instance.key)
        for process in self.agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.agents:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self.scheduler is not None:
            await self.scheduler.stop(grace=0)


@pytest.fixture
async def control(
    tmp_path: Path, tokens: Tokens, temporal_address: str, aws_credentials: None
) -> AsyncIterator[ControlPlaneHarness]:
    """The harness; it takes the fake AWS credentials so that they outlive its clean-up."""
    harness = ControlPlaneHarness(tmp_path, tokens, temporal_address)
    try:
        yield harness
    finally:
        await harness.close()
