"""What the gateway tests run against: simulated SGLang replicas as real processes, a small
GatewayService servicer on real gRPC whose fleet the test sets, and gateways in the test's own
event loop, all on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2

from common.v1 import agent_pb2 as pb
from common.v1 import agent_pb2_grpc as pb_grpc
from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.conftest import write_yaml

MODEL = "tiny-chat"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SimReplica:
    """``python -m agent.runtimes.simulated_server`` on a free port (no prefix cache)."""

    def __init__(self, tmp_path: Path, replica_id: str, *extra: str) -> None:
        self.replica_id = replica_id
        model = tmp_path / "model"
        model.mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"{replica_id}.log"
        self._log = self.log_path.open("wb")
        command = [
            sys.executable,
            "-m",
            "agent.runtimes.simulated_server",
            *("--model-path", str(model), "--served-model-name", MODEL),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--enable-metrics", "--disable-radix-cache", "--warmup-s", "0"),
            *extra,
        ]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ)
        )

    async def wait_healthy(self, within_s: float = 20.0) -> None:
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url + "/health") as r:
                        if r.status == 200:
                            return
                assert self.proc.poll() is None, self.log_path.read_text()
                assert time.monotonic() < deadline, f"{self.replica_id} not healthy"
                await asyncio.sleep(0.03)

    async def loads(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/v1/loads") as r,
        ):
            data: dict[str, Any] = (await r.json())["loads"][0]
            return data

    async def running(self) -> int:
        loads = await self.loads()
        return int(loads["num_running_reqs"]) + int(loads["num_waiting_reqs"])

    async def requests_total(self) -> int:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/metrics") as r:
            text = await r.text()
        for line in text.splitlines():
            if line.startswith("sglang:num_requests_total"):
                return int(float(line.rsplit(" ", 1)[1]))
        raise AssertionError("no sglang:num_requests_total")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        self._log.close()


ReplicaFactory = Callable[..., Awaitable[list[SimReplica]]]


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[ReplicaFactory]:
    """Start simulated replicas (in parallel); every one is killed when the test ends."""
    started: list[SimReplica] = []

    async def start(*ids: str, extra: Sequence[str] = ()) -> list[SimReplica]:
        batch = [SimReplica(tmp_path, replica_id, *extra) for replica_id in ids]
        started.extend(batch)
        await asyncio.gather(*(r.wait_healthy() for r in batch))
        return batch

    yield start
    for replica in started:
        replica.stop()


def routable(
    replica: SimReplica | str,
    *,
    port: int = 0,
    deployment: str = "chat",
    pool: str = "reserved-eu",
    provider: str = "onprem",
    region: str = "eu-frankfurt",
    residency_group: str = "eu",
    state: pb.ReplicaState.ValueType = pb.REPLICA_STATE_HEALTHY,
    max_running: int = 0,
) -> pb.RoutableReplica:
    replica_id = replica if isinstance(replica, str) else replica.replica_id
    return pb.RoutableReplica(
        replica_id=replica_id,
        deployment=deployment,
        agent_id=f"agent-{replica_id}",
        host="127.0.0.1",
        port=port or (0 if isinstance(replica, str) else replica.port),
        pool=pool,
        provider=provider,
        region=region,
        residency_group=residency_group,
        state=state,
        max_running_requests=max_running,
    )


def rented(replica: SimReplica, region: str = "eu-central-1", **kw: Any) -> pb.RoutableReplica:
    return routable(replica, pool="spill-aws", provider="aws", region=region, **kw)


class FakeScheduler(pb_grpc.GatewayServiceServicer):
    """The scheduler's GatewayService as the contract says: the fleet as a whole set on every
    change and once per interval; reports kept; only its gateway token accepted."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.token = "spw_gateway-test-token"
        self.interval_s = interval_s
        self.instance = uuid.uuid4().hex[:8]
        self.replicas: list[pb.RoutableReplica] = []
        self.reports: list[pb.GatewayReport] = []
        self.watches = 0
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._wakeups: set[asyncio.Event] = set()

    async def start(self, port: int = 0) -> None:
        self._server = grpc.aio.server()
        pb_grpc.add_GatewayServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port or self.port}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0)
            self._server = None

    async def restart(self) -> None:
        """A new scheduler process on the same port: a new instance, knowing no replica."""
        await self.stop()
        self.instance = uuid.uuid4().hex[:8]
        self.replicas = []
        await self.start(self.port)

    def set_fleet(self, replicas: Sequence[pb.RoutableReplica]) -> None:
        self.replicas = list(replicas)
        for event in self._wakeups:
            event.set()

    def _fleet(self) -> pb.RoutableFleet:
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(self.interval_s * 1e9))
        return pb.RoutableFleet(
            replicas=self.replicas, report_interval=interval, scheduler_instance=self.instance
        )

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = tuple(context.invocation_metadata() or ())
        if ("authorization", f"Bearer {self.token}") not in metadata:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")

    async def WatchFleet(
        self, request: pb.WatchFleetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.RoutableFleet]:
        await self._check(context)
        assert request.gateway_id == "gw-1"
        self.watches += 1
        wake = asyncio.Event()
        self._wakeups.add(wake)
        try:
            while True:
                wake.clear()
                yield self._fleet()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.interval_s)
        finally:
            self._wakeups.discard(wake)

    async def ReportTraffic(
        self, request: pb.GatewayReport, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GatewayReportAck:
        await self._check(context)
        self.reports.append(request)
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(self.interval_s * 1e9))
        return pb.GatewayReportAck(report_interval=interval)


@pytest.fixture
async def scheduler() -> AsyncIterator[FakeScheduler]:
    fake = FakeScheduler()
    await fake.start()
    yield fake
    await fake.stop()


def deployment(
    *,
    model: str = MODEL,
    pools: Sequence[str] = ("reserved-eu",),
    residency: str | None = "eu",
    managed: Sequence[dict[str, Any]] = (),
    **gateway: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": model,
        "weights": "/models/tiny",
        "runtime": "simulated",
        "sku": "L40S",
        "gpus": 1,
        "pools": list(pools),
        "min_replicas": 0,
        "max_replicas": 4,
        "autoscaling": {"target": 4},
        "gateway": {"warmup_s": 0, **gateway},
    }
    if residency is not None:
        spec["spillover"] = {"residency": residency}
    if managed:
        spec["managed"] = list(managed)
    return spec


def managed_endpoint(url: str, name: str = "hosted", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "base_url": url + "/v1",
        "residency_group": "eu",
        "usd_per_million_input_tokens": 0.5,
        "usd_per_million_output_tokens": 1.5,
        "max_concurrency": 8,
        **extra,
    }


GatewayFactory = Callable[..., Awaitable[Gateway]]


class SchedulerAddress(Protocol):
    """What a gateway needs of a scheduler: its port and the gateway token it accepts."""

    @property
    def token(self) -> str: ...

    @property
    def port(self) -> int: ...


@pytest.fixture
def gateway_config(tmp_path: Path) -> Callable[..., GatewayConfig]:
    def make(
        deployments: dict[str, Any], scheduler: SchedulerAddress, **overrides: Any
    ) -> GatewayConfig:
        policy = write_yaml(tmp_path / "policy.yaml", {"deployments": deployments})
        token = tmp_path / "gateway.token"
        token.write_text(scheduler.token + "\n")
        fields: dict[str, Any] = {
            "gateway_id": "gw-1",
            "listen": "127.0.0.1:0",
            "policy_file": policy,
            "policy_reload_every_s": 0.1,
            "scheduler": {"address": f"127.0.0.1:{scheduler.port}", "token_file": token},
            "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.3},
            "health_probe_interval_s": 0.1,
            **overrides,
        }
        return GatewayConfig.model_validate(fields)

    return make


@pytest.fixture
async def start_gateway(
    gateway_config: Callable[..., GatewayConfig],
) -> AsyncIterator[GatewayFactory]:
    """Start gateways in this event loop; each waits until it has the scheduler's fleet."""
    started: list[Gateway] = []

    async def start(
        deployments: dict[str, Any], scheduler: FakeScheduler, **overrides: Any
    ) -> Gateway:
        gateway = Gateway(gateway_config(deployments, scheduler, **overrides))
        await gateway.start()
        started.append(gateway)
        expected = {r.replica_id for r in scheduler.replicas}
        await until(lambda: set(gateway.deployments.fleet.replicas) == expected, 5.0)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()


async def until(check: Callable[[], object], within_s: float = 10.0, what: str = "") -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within_s, f"{what or 'condition'} not met"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
