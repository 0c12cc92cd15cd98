"""The replica supervisor with the simulated runtime: real processes, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.gpus import GpuInfo
from agent.processes import start_time
from agent.runtimes import ServerClient
from agent.status import ReplicaState
from agent.supervisor import (
    GpuTaken,
    ModelPathMissing,
    NeverHealthy,
    PortInUse,
    ReplicaConflict,
    ReplicaSpec,
    Supervisor,
    SupervisorSettings,
    UnknownGpu,
)
from tests.conftest import eventually

GPUS = [GpuInfo(i, f"static-test-{i}", "NVIDIA H100 80GB HBM3", 80 << 30) for i in range(4)]
WITHIN_S = 60.0  # generous: the machine is shared


def settings(state_dir: Path, **overrides: Any) -> SupervisorSettings:
    fields: dict[str, Any] = {
        "state_dir": state_dir,
        "host": "127.0.0.1",
        "port_range": (31000, 31999),
        "default_runtime": "simulated",
        "health_interval_s": 0.1,
        "health_failures": 3,
        "start_timeout_s": 60.0,
        "stop_timeout_s": 10.0,
        "drain_timeout_s": 60.0,
        "restart_backoff_initial_s": 0.1,
        "restart_backoff_max_s": 0.5,
        "crash_loop_restarts": 3,
        "crash_loop_window_s": 120.0,
    }
    fields.update(overrides)
    return SupervisorSettings(**fields)


def spec(
    model: Path, replica_id: str = "r1", gpus: tuple[int, ...] = (0,), **kw: Any
) -> ReplicaSpec:
    extra = ("--warmup-s", "0.2", "--speedup", "4", *kw.pop("extra_args", ()))
    return ReplicaSpec(replica_id, "chat", str(model), gpu_indices=gpus, extra_args=extra, **kw)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "weights"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


class Supervisors:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.made: list[Supervisor] = []

    def new(self, **overrides: Any) -> Supervisor:
        supervisor = Supervisor(settings(self.state_dir, **overrides), GPUS)
        self.made.append(supervisor)
        return supervisor


@pytest.fixture
async def supervisors(tmp_path: Path) -> AsyncIterator[Supervisors]:
    made = Supervisors(tmp_path / "state")
    yield made
    for supervisor in made.made:
        await supervisor.close(stop_replicas=True)


def state_of(supervisor: Supervisor, replica_id: str = "r1") -> Callable[[], ReplicaState]:
    return lambda: supervisor.status(replica_id).state


async def wait_state(supervisor: Supervisor, state: ReplicaState, replica_id: str = "r1") -> None:
    await eventually(lambda: supervisor.status(replica_id).state is state, within_s=WITHIN_S)


def alive(pid: int) -> bool:
    return start_time(pid) is not None


async def test_replica_starts_healthy_pinned_to_its_gpus_and_stops(
    supervisors: Supervisors, model: Path
) -> None:
    sup = supervisors.new()
    first = sup.start(spec(model, gpus=(2, 1)))
    assert first.state is ReplicaState.STARTING and 31000 <= first.port <= 31999
    status = await sup.wait_healthy("r1", timeout_s=WITHIN_S)
    assert status.gpu_indices == (1, 2) and status.runtime == "simulated"
    assert sup.gpu_owners() == {1: "r1", 2: "r1"}
    client = ServerClient(f"http://127.0.0.1:{status.port}")
    info = await client.server_info()
    await client.close()
    assert info is not None
    assert info["simulated"]["cuda_visible_devices"] == "1,2" and info["tp_size"] == 2
    assert info["simulated"]["gpu_profile"] == "2xH100-80GB"
    # The same spec again is the same replica, not a second process.
    pid = sup.pid("r1")
    assert sup.start(spec(model, gpus=(1, 2))).port == status.port and sup.pid("r1") == pid

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{status.port}", timeout=60) as h:
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 2000}}
        busy = [asyncio.create_task(h.post("/generate", json=body)) for _ in range(3)]
        await eventually(lambda: sup.status("r1").load.running_requests == 3, within_s=WITHIN_S)
        assert sup.status("r1").load.generation_tokens_per_second >= 0
        stopped = await sup.stop("r1")
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
    assert stopped.state is ReplicaState.STOPPED and stopped.gpu_indices == ()
    assert pid is not None and not alive(pid)
    assert sup.gpu_owners() == {}
    assert (await sup.stop("r1")).state is ReplicaState.STOPPED  # idempotent


async def test_a_killed_replica_is_restarted(supervisors: Supervisors, model: Path) -> None:
    sup = supervisors.new()
    sup.start(spec(model))
    await sup.wait_healthy("r1", timeout_s=WITHIN_S)
    pid = sup.pid("r1")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: sup.status("r1").restarts == 1, within_s=WITHIN_S)
    assert "killed by SIGKILL" in sup.status("r1").state_reason
    await wait_state(sup, ReplicaState.HEALTHY)
    assert sup.pid("r1") not in (None, pid)
    assert sup.status("r1").restarts == 1


async def test_a_crash_loop_is_reported_not_hidden(supervisors: Supervisors, model: Path) -> None:
    sup = supervisors.new()
    sup.start(spec(model, extra_args=("--crash-after-s", "0.5")))
    await sup.wait_healthy("r1", timeout_s=WITHIN_S)
    await wait_state(sup, ReplicaState.CRASH_LOOPING)
    status = sup.status("r1")
    assert status.restarts >= 3
    assert "exit code 3: simulated crash" in status.state_reason
    assert "crashes in 120s" in status.state_reason
    assert status.gpu_indices == (0,)  # still holds its GPU: it keeps being restarted


async def test_a_replica_that_cannot_start_fails_with_its_reason(
    supervisors: Supervisors, model: Path
) -> None:
    sup = supervisors.new()
    sup.start(spec(model, extra_args=("--no-such-flag",)))
    with pytest.raises(NeverHealthy, match="failed 3 times without ever becoming healthy"):
        await sup.wait_healthy("r1", timeout_s=WITHIN_S)
    status = sup.status("r1")
    assert status.state is ReplicaState.FAILED
    assert "exit code 2" in status.state_reason and "--no-such-flag" in status.state_reason
    assert sup.gpu_owners() == {}


async def test_a_replica_never_healthy_fails_after_the_start_timeout(
    supervisors: Supervisors, model: Path
) -> None:
    sup = supervisors.new(start_timeout_s=2.0)
    sup.start(spec(model, extra_args=("--fail-health",)))
    with pytest.raises(NeverHealthy, match="never became healthy within 2s"):
        await sup.wait_healthy("r1", timeout_s=WITHIN_S)
    assert "503" in sup.status("r1").state_reason


async def test_health_fails_only_after_consecutive_failures(
    supervisors: Supervisors, model: Path
) -> None:
    sup = supervisors.new(stop_timeout_s=1.0)
    sup.start(spec(model))
    await sup.wait_healthy("r1", timeout_s=WITHIN_S)
    pid = sup.pid("r1")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only health checks can tell
    try:
        await eventually(lambda: sup.status("r1").restarts == 1, within_s=WITHIN_S)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert "health check failed 3 times in a row" in sup.status("r1").state_reason
    await wait_state(sup, ReplicaState.HEALTHY)
    assert not alive(pid)


async def test_bad_input_is_refused_with_a_specific_reason(
    supervisors: Supervisors, model: Path, tmp_path: Path
) -> None:
    sup = supervisors.new()
    with pytest.raises(ModelPathMissing, match="does not exist on this node"):
        sup.start(spec(tmp_path / "absent"))
    assert sup.status("r1").state is ReplicaState.FAILED  # and it is reported
    with pytest.raises(UnknownGpu, match="GPU 7 does not exist"):
        sup.start(spec(model, "r2", gpus=(7,)))
    sup.start(spec(model, "r3", gpus=(0, 1)))
    with pytest.raises(GpuTaken, match="GPU 1 is held by replica r3"):
        sup.start(spec(model, "r4", gpus=(1, 2)))
    with pytest.raises(ReplicaConflict, match="different spec"):
        sup.start(spec(model, "r3", gpus=(2,)))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is already in use"):
            sup.start(spec(model, "r5", gpus=(3,), port=port))
    assert sup.status("r5").state_reason.startswith(f"port {port}")
    # Refusals hold nothing: GPU 3 is still free for the next replica.
    assert sup.gpu_owners() == {0: "r3", 1: "r3"}
    sup.start(spec(model, "r6", gpus=(3,)))
    assert sup.gpu_owners()[3] == "r6"


async def test_drain_under_load_drops_no_request(supervisors: Supervisors, model: Path) -> None:
    sup = supervisors.new()
    port = sup.start(spec(model, extra_args=("--max-running-requests", "4"))).port
    await sup.wait_healthy("r1", timeout_s=WITHIN_S)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        body = {"text": "drain me", "sampling_params": {"max_new_tokens": 120}}
        requests = [asyncio.create_task(http.post("/generate", json=body)) for _ in range(12)]

        def all_in() -> bool:
            load = sup.status("r1").load
            return load.running_requests == 4 and load.queued_requests == 8

        await eventually(all_in, within_s=WITHIN_S)
        drained = await sup.drain("r1")
        responses = await asyncio.gather(*requests, return_exceptions=True)
    assert drained.state is ReplicaState.STOPPED
    assert drained.state_reason == "drained: exit code 0"
    codes = [getattr(r, "status_code", repr(r)) for r in responses]
    assert codes == [200] * 12
    assert all(r.json()["meta_info"]["completion_tokens"] == 120 for r in responses)  # type: ignore[union-attr]


async def test_a_new_agent_adopts_running_replicas_and_restarts_lost_ones(
    supervisors: Supervisors, model: Path
) -> None:
    first = supervisors.new()
    first.start(spec(model, "keep", gpus=(0,)))
    first.start(spec(model, "lost", gpus=(1,)))
    await first.wait_healthy("keep", timeout_s=WITHIN_S)
    await first.wait_healthy("lost", timeout_s=WITHIN_S)
    keep_pid, lost_pid = first.pid("keep"), first.pid("lost")
    assert keep_pid is not None and lost_pid is not None
    port = first.status("keep").port
    await first.close(stop_replicas=False)  # the agent exits; its replicas do not
    supervisors.made.remove(first)
    assert alive(keep_pid)
    os.kill(lost_pid, signal.SIGKILL)
    await eventually(lambda: not alive(lost_pid), within_s=WITHIN_S)

    second = supervisors.new()
    outcome = await second.adopt()
    assert outcome == {
        "keep": f"adopted: pid {keep_pid}",
        "lost": "restarted: its process was gone",
    }
    kept = await second.wait_healthy("keep", timeout_s=WITHIN_S)
    assert second.pid("keep") == keep_pid and kept.port == port
    await second.wait_healthy("lost", timeout_s=WITHIN_S)
    assert second.pid("lost") not in (None, lost_pid)
    assert second.gpu_owners() == {0: "keep", 1: "lost"}
    with pytest.raises(GpuTaken):
        second.start(spec(model, "other", gpus=(0,)))
    # An adopted process is watched too: when it dies it is restarted.
    os.kill(keep_pid, signal.SIGKILL)
    await eventually(lambda: second.status("keep").restarts == 1, within_s=WITHIN_S)
    await wait_state(second, ReplicaState.HEALTHY, "keep")


async def test_state_file_replicas_being_drained_are_cleaned_up(
    supervisors: Supervisors, model: Path
) -> None:
    first = supervisors.new()
    first.start(spec(model))
    await first.wait_healthy("r1", timeout_s=WITHIN_S)
    pid = first.pid("r1")
    assert pid is not None
    first._replicas["r1"].state = ReplicaState.DRAINING  # as if the agent died mid-drain
    first._save()
    await first.close(stop_replicas=False)
    supervisors.made.remove(first)
    second = supervisors.new()
    assert await second.adopt() == {"r1": "cleaned up: it was draining"}
    assert not alive(pid)
    assert second.statuses() == []


def test_specs_compare_by_value() -> None:
    a = ReplicaSpec("r", "d", "/m", gpu_indices=(0,))
    assert a == dataclasses.replace(a) and a != dataclasses.replace(a, port=5)


def test_the_readme_replica_example_is_a_valid_agent_config() -> None:
    import re

    import yaml

    from agent.config import AgentConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)
    base = next(b for b in blocks if b.startswith("# agent.yaml\n"))
    extra = next(b for b in blocks if b.startswith("# agent.yaml: replicas"))
    config = AgentConfig.model_validate({**yaml.safe_load(base), **yaml.safe_load(extra)})
    assert config.replicas[0].gpus == [0, 1] and config.temporal is not None
    assert config.runtime.on_exit == "keep"


def test_the_agent_config_refuses_a_gpu_given_to_two_replicas(tmp_path: Path) -> None:
    from agent.config import load_agent_config
    from common.configfile import ConfigError
    from tests.conftest import write_yaml

    base: dict[str, Any] = {
        "agent_id": "node-a",
        "scheduler": {"address": "s:1", "token_file": "t"},
        "labels": {"pool": "p", "provider": "onprem", "region": "r"},
        "replicas": [
            {"replica_id": "a", "deployment": "d", "model_path": "m", "gpus": [0, 1]},
            {"replica_id": "b", "deployment": "d", "model_path": "m", "gpus": [1]},
        ],
    }
    with pytest.raises(ConfigError, match="GPU 1 is given to both a and b"):
        load_agent_config(write_yaml(tmp_path / "a.yaml", base))
    base["replicas"] = base["replicas"][:1]
    base["runtime"] = {"port_range": [40000, 30000]}
    with pytest.raises(ConfigError, match="port_range must be"):
        load_agent_config(write_yaml(tmp_path / "b.yaml", base))
    del base["runtime"]
    config = load_agent_config(write_yaml(tmp_path / "c.yaml", base))
    assert config.replicas[0].model_path == tmp_path / "m"  # relative to the file
    assert config.temporal is None and config.runtime.default == "sglang"


async def test_a_picked_port_taken_by_someone_else_moves_the_replica(
    supervisors: Supervisors, model: Path
) -> None:
    """Two agents on one host can race for the same free port: the loser moves, and its health
    is checked on its own new port, not on the winner's server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        first = probe.getsockname()[1]
    supervisor = supervisors.new(port_range=(first, first + 5))
    status = supervisor.start(spec(model))
    assert status.port == first
    with socket.socket() as squatter:  # binds before the replica's server does
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first))
        squatter.listen()
        await wait_state(supervisor, ReplicaState.HEALTHY)
        moved = supervisor.status("r1")
        assert moved.port != first and moved.restarts >= 1
        async with httpx.AsyncClient() as http:
            info = (await http.get(f"http://127.0.0.1:{moved.port}/server_info")).json()
        assert info["port"] == moved.port


async def test_after_a_crash_on_a_port_in_use_the_replica_moves_even_if_it_looks_free(
    supervisors: Supervisors, model: Path
) -> None:
    """The server that took the port may be between its own restarts when this one restarts:
    the port looks free, yet the two would race for it again. A crash that says "address
    already in use" moves the replica, and the search starts at a replica-specific place."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        first = probe.getsockname()[1]
    supervisor = supervisors.new(port_range=(first, first + 50))
    assert supervisor.start(spec(model)).port == first
    replica = supervisor._replicas["r1"]
    supervisor._repick_port(replica)  # no crash and the port is free: it stays
    assert replica.port == first
    supervisor._repick_port(replica, in_use=True)
    assert replica.port != first
    moved = replica.port
    supervisor._repick_port(replica, in_use=True)
    assert replica.port not in (first, moved)
