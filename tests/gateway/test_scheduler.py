"""The gateway against the real scheduler: agents report a simulated replica, the scheduler's
GatewayService streams it to the gateway, which routes to it, reports its traffic back, keeps
routing while the scheduler is gone and follows a drain the scheduler starts."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from agent.gpus import StaticInventory
from agent.reporter import Reporter
from agent.status import ReplicaLoad, ReplicaState, ReplicaStatus
from gateway.app import Gateway
from gateway.config import GatewayConfig
from scheduler.server import Scheduler
from tests.conftest import SchedulerFactory, Tokens, agent_config
from tests.gateway.conftest import MODEL, ReplicaFactory, SimReplica, deployment, until


@dataclass
class Address:
    token: str
    port: int


@contextlib.asynccontextmanager
async def reporting(
    scheduler: Scheduler, tokens: Tokens, tmp_path: Path, replica: SimReplica
) -> AsyncIterator[Reporter]:
    """A real agent reporter announcing ``replica`` (running on this host) as healthy."""
    status = ReplicaStatus(
        replica_id=replica.replica_id,
        deployment="chat",
        model=MODEL,
        runtime="simulated",
        port=replica.port,
        gpu_indices=(0,),
        state=ReplicaState.HEALTHY,
        load=ReplicaLoad(max_running_requests=4),
    )
    config = agent_config(
        "node-a",
        f"127.0.0.1:{scheduler.port}",
        tokens.write("node-a", tmp_path),
        advertise_host="127.0.0.1",
    )
    reporter = Reporter(
        config,
        StaticInventory.from_config(config.gpus, "node-a"),
        tokens.clear["node-a"],
        lambda: (status,),
        version="test",
        hostname="test-host",
        rng=random.Random(1),
    )
    task = asyncio.create_task(reporter.run())
    try:
        yield reporter
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_real_scheduler_feeds_the_gateway_and_hears_its_traffic(
    start_scheduler: SchedulerFactory,
    tokens: Tokens,
    tmp_path: Path,
    replicas: ReplicaFactory,
    gateway_config: Callable[..., GatewayConfig],
    http: aiohttp.ClientSession,
) -> None:
    token = tokens.add("gw-1", "gateway")
    scheduler = await start_scheduler()
    (replica,) = await replicas("r-eu-0", extra=("--speedup", "50"))
    gateway = Gateway(gateway_config({"chat": deployment()}, Address(token, scheduler.port)))
    await gateway.start()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        async with reporting(scheduler, tokens, tmp_path, replica):
            dep = gateway.deployments.by_name["chat"]
            took = await until(lambda: "r-eu-0" in dep.replicas and dep.replicas["r-eu-0"].healthy)
            print(f"the replica reached the gateway {took * 1000:.0f} ms after the agent started")
            assert dep.replicas["r-eu-0"].base_cap == 4  # the replica's own max_running_requests
            async with http.post(gateway.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200 and r.headers["x-spillway-target"] == "r-eu-0"
            await until(lambda: scheduler.fleet.gateways(), 3.0, "a traffic report arrived")
            (record,) = scheduler.fleet.gateways()
            assert record.gateway_id == "gw-1"
            await until(
                lambda: scheduler.fleet.gateways()[0].report.deployments[0].tiers[0].requests == 1,
                3.0,
            )

            # The scheduler goes away: the gateway routes on with the last fleet it knew.
            port = scheduler.port
            await scheduler.stop(grace=0)
            await until(lambda: not gateway.link.state.connected, 5.0, "the gateway noticed")
            async with http.post(gateway.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200 and r.headers["x-spillway-target"] == "r-eu-0"

            # A new scheduler on the same address: both the agent and the gateway come back,
            # and the replica stays routable throughout.
            restarted = await start_scheduler(listen=f"127.0.0.1:{port}")
            await until(lambda: gateway.link.state.connected, 5.0, "the gateway reconnected")
            assert gateway.deployments.fleet.instance == restarted.instance
            assert dep.replicas["r-eu-0"].healthy
            await until(lambda: restarted.fleet.get("node-a") is not None, 5.0)

            # The scheduler drains the replica through the gateways.
            await until(lambda: restarted.fleet.mark_draining("r-eu-0"), 5.0)
            await until(lambda: not dep.replicas["r-eu-0"].healthy, 3.0, "the drain arrived")
            assert dep.replicas["r-eu-0"].target(0.0, 0.0).accepting is False
    finally:
        await gateway.stop()
