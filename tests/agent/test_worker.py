"""The node worker against a real Temporal dev server: activities on ``agent-<id>``, refusals
that are not retried, and a start that survives the worker being killed mid-activity."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from agent.processes import start_time
from agent.supervisor import Supervisor
from agent.worker import NodeWorker
from common.temporallink import TemporalLink
from decisions.fleetview import ReplicaState
from scheduler import fleet
from spillway.serve.agent import node_activities
from tests.agent.prefetch.faults import FaultyOrigin
from tests.agent.test_supervisor import GPUS, WITHIN_S, settings
from tests.conftest import SchedulerFactory, Tokens, eventually, write_yaml


@dataclass
class Call:
    """One activity call on a node's task queue, as a workflow would make it."""

    activity: str
    task_queue: str
    argument: dict[str, Any]
    heartbeat_timeout_s: float = 10.0
    maximum_attempts: int = 5
    extra: dict[str, Any] = field(default_factory=dict)


@workflow.defn(name="NodeCall", sandboxed=False)
class NodeCall:
    @workflow.run
    async def run(self, call: Call) -> Any:
        return await workflow.execute_activity(
            call.activity,
            call.argument,
            task_queue=call.task_queue,
            start_to_close_timeout=timedelta(seconds=300),
            heartbeat_timeout=timedelta(seconds=call.heartbeat_timeout_s),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=0.2),
                backoff_coefficient=1.0,
                maximum_attempts=call.maximum_attempts,
            ),
        )


class Harness:
    def __init__(self, client: Client, workflow_queue: str) -> None:
        self.client = client
        self.workflow_queue = workflow_queue

    async def call(self, call: Call) -> Any:
        return await self.client.execute_workflow(
            NodeCall.run,
            call,
            id=f"node-call-{uuid.uuid4().hex[:10]}",
            task_queue=self.workflow_queue,
            execution_timeout=timedelta(seconds=300),
        )


@pytest.fixture
async def harness(temporal_address: str) -> AsyncIterator[Harness]:
    client = await Client.connect(temporal_address)
    queue = f"tests-{uuid.uuid4().hex[:8]}"
    worker = Worker(
        client, task_queue=queue, workflows=[NodeCall], workflow_runner=UnsandboxedWorkflowRunner()
    )
    async with worker:
        yield Harness(client, queue)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "weights"
    path.mkdir()
    return path


@pytest.fixture
async def node(temporal_address: str, tmp_path: Path) -> AsyncIterator[tuple[str, Supervisor]]:
    """An in-process supervisor and node worker; yields the worker's task queue."""
    supervisor = Supervisor(settings(tmp_path / "state"), GPUS)
    queue = f"agent-node-{uuid.uuid4().hex[:8]}"
    worker = NodeWorker(TemporalLink(address=temporal_address), queue, node_activities(supervisor))
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.running.wait(), WITHIN_S)
    yield queue, supervisor
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await supervisor.close(stop_replicas=True)


def start_args(model: Path, replica_id: str = "r1", **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "replica_id": replica_id,
        "deployment": "chat",
        "model_path": str(model),
        "gpu_indices": [0],
        "extra_args": ["--warmup-s", "0.3"],
    }
    args.update(extra)
    return args


async def test_start_drain_and_stop_through_the_task_queue(
    harness: Harness, node: tuple[str, Supervisor], model: Path
) -> None:
    queue, supervisor = node
    started = await harness.call(Call("start_replica", queue, start_args(model)))
    assert started["state"] == "healthy" and started["restarts"] == 0
    assert started["pid"] == supervisor.pid("r1") and started["port"] > 0
    again = await harness.call(Call("start_replica", queue, start_args(model)))
    assert again == started  # idempotent: same replica, same process

    drained = await harness.call(Call("drain_replica", queue, {"replica_id": "r1"}))
    assert drained == {"replica_id": "r1", "state": "stopped", "reason": "drained: exit code 0"}
    assert start_time(started["pid"]) is None
    stopped = await harness.call(Call("stop_replica", queue, {"replica_id": "nope"}))
    assert stopped["state"] == "stopped" and "no replica nope" in stopped["reason"]


async def test_prefetch_then_start_through_the_task_queue(
    harness: Harness, node: tuple[str, Supervisor], tmp_path: Path
) -> None:
    """The node worker serves the weight prefetch too: fetch a model, then serve it."""
    queue, supervisor = node
    origin = FaultyOrigin()
    try:
        shard = os.urandom(3 * 1024 * 1024 + 17)
        origin.add("config.json", b'{"model_type": "llama"}')
        origin.add("model.bin", shard)
        destination = tmp_path / "prefetched"
        fetched = await harness.call(
            Call(
                "prefetch_weights",
                queue,
                {
                    "source": origin.base,
                    "destination": str(destination),
                    "files": ["config.json", "model.bin"],
                },
            )
        )
    finally:
        origin.close()
    assert fetched["files"] == 2
    assert fetched["total_bytes"] == len(shard) + len(b'{"model_type": "llama"}')
    assert (destination / "model.bin").read_bytes() == shard
    started = await harness.call(Call("start_replica", queue, start_args(destination)))
    assert started["state"] == "healthy"
    assert supervisor.pid("r1") == started["pid"]


async def refusal(harness: Harness, call: Call) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as failure:
        await harness.call(call)
    activity_error = failure.value.cause
    assert isinstance(activity_error, ActivityError)
    cause = activity_error.cause
    assert isinstance(cause, ApplicationError)
    assert cause.non_retryable
    return cause


async def test_bad_input_fails_at_once_with_the_reason(
    harness: Harness, node: tuple[str, Supervisor], model: Path, tmp_path: Path
) -> None:
    queue, supervisor = node
    missing = await refusal(
        harness, Call("start_replica", queue, start_args(tmp_path / "absent", "m"))
    )
    assert missing.type == "ModelPathMissing" and "absent does not exist" in missing.message

    await harness.call(Call("start_replica", queue, start_args(model, "holder")))
    taken = await refusal(harness, Call("start_replica", queue, start_args(model, "second")))
    assert taken.type == "GpuTaken" and "GPU 0 is held by replica holder" in taken.message

    port = supervisor.status("holder").port
    busy = await refusal(
        harness, Call("start_replica", queue, start_args(model, "p", gpu_indices=[1], port=port))
    )
    assert busy.type == "PortInUse" and f"port {port}" in busy.message

    sick = start_args(model, "sick", gpu_indices=[2], extra_args=["--fail-health"])
    sick["healthy_timeout_s"] = 2.0
    never = await refusal(harness, Call("start_replica", queue, sick))
    assert never.type == "NeverHealthy" and "not healthy after 2s" in never.message
    # Each refusal is reported with the same reason the activity gave.
    reasons = {s.replica_id: s.state_reason for s in supervisor.statuses()}
    assert "absent does not exist" in reasons["m"] and "held by replica holder" in reasons["second"]


async def test_a_start_survives_the_worker_being_killed(
    harness: Harness,
    temporal_address: str,
    start_scheduler: SchedulerFactory,
    tokens: Tokens,
    tmp_path: Path,
    model: Path,
) -> None:
    scheduler = await start_scheduler()
    state_dir = tmp_path / "node-state"
    config = write_yaml(
        tmp_path / "agent.yaml",
        {
            "agent_id": "node-a",
            "scheduler": {
                "address": f"127.0.0.1:{scheduler.port}",
                "token_file": str(tokens.write("node-a", tmp_path)),
            },
            "labels": {"pool": "reserved-eu", "provider": "onprem", "region": "eu-frankfurt"},
            "gpus": {
                "discovery": "static",
                "static": [{"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": 2}],
            },
            "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
            "state_dir": str(state_dir),
            "runtime": {
                "default": "simulated",
                "host": "127.0.0.1",
                "port_range": [30000, 30999],
                "health_interval_s": 0.2,
                "on_exit": "stop",
            },
            "temporal": {"address": temporal_address},
        },
    )
    logs = (tmp_path / "agent.log").open("ab")

    def agent() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "spillway", "agent", "run", "--config", str(config)],
            stdout=logs,
            stderr=subprocess.STDOUT,
        )

    def recorded_pid() -> int | None:
        try:
            records = json.loads((state_dir / "replicas.json").read_text())["replicas"]
        except (OSError, ValueError, KeyError):
            return None
        pids = [r["pid"] for r in records if r["spec"]["replica_id"] == "r1" and r["pid"]]
        return pids[0] if pids else None

    first = agent()
    second: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    try:
        # A slow warm-up keeps the activity in flight while its worker dies.
        call = Call(
            "start_replica",
            "agent-node-a",
            start_args(model, extra_args=["--warmup-s", "6"]),
            heartbeat_timeout_s=2.0,
        )
        result = asyncio.create_task(harness.call(call))
        await eventually(lambda: recorded_pid() is not None, within_s=WITHIN_S)
        pid = recorded_pid()
        assert pid is not None
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        assert start_time(pid) is not None  # the replica outlives its agent
        second = agent()
        started = await asyncio.wait_for(result, WITHIN_S * 2)
        assert started["state"] == "healthy"
        assert started["pid"] == pid  # adopted, not launched a second time

        def reported() -> fleet.Replica | None:
            record = scheduler.fleet.get("node-a")
            if record is None or record.report is None:
                return None
            found = [r for r in record.report.replicas if r.replica_id == "r1"]
            return found[0] if found and found[0].state is ReplicaState.HEALTHY else None

        await eventually(lambda: reported() is not None, within_s=WITHIN_S)
        replica = reported()
        assert replica is not None and replica.runtime == "simulated"
        assert replica.gpu_indices == (0,) and replica.port == started["port"]
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
        assert start_time(pid) is None  # on_exit: stop
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if pid is not None and start_time(pid) is not None:
            os.killpg(pid, signal.SIGKILL)
        logs.close()
