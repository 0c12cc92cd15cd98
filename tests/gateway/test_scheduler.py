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
    scheduler: Scheduler,
    tokens: Tokens,
    tmp_path: Path,
    replica: SimReplica,
    also: Scheduler | None = None,
) -> AsyncIterator[Reporter]:
    """A real agent reporter announcing ``replica`` (running on this host) as healthy, to
    ``scheduler`` (and to ``also``)."""
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
    if also is not None:
        section = config.scheduler.model_copy(
            update={
                "address": None,
                "addresses": [f"127.0.0.1:{s.port}" for s in (scheduler, also)],
            }
        )
        config = config.model_copy(update={"scheduler": section})
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


async def test_two_schedulers_the_gateway_reports_to_both_and_fails_over_without_flapping(
    start_scheduler: SchedulerFactory,
    tokens: Tokens,
    tmp_path: Path,
    replicas: ReplicaFactory,
    gateway_config: Callable[..., GatewayConfig],
    http: aiohttp.ClientSession,
) -> None:
    token = tokens.add("gw-1", "gateway")
    first = await start_scheduler()
    second = await start_scheduler()
    addresses = [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]
    (replica,) = await replicas("r-eu-0", extra=("--speedup", "50"))
    config = gateway_config({"chat": deployment()}, Address(token, first.port))
    scheduler_section = config.scheduler.model_copy(
        update={"address": None, "addresses": addresses}
    )
    gateway = Gateway(config.model_copy(update={"scheduler": scheduler_section}))
    await gateway.start()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    link = gateway.link.state
    interval = first.config.report_interval_s
    try:
        async with reporting(first, tokens, tmp_path, replica, also=second):
            dep = gateway.deployments.by_name["chat"]
            await until(lambda: "r-eu-0" in dep.replicas and dep.replicas["r-eu-0"].healthy)
            assert link.watching == addresses[0]
            assert gateway.deployments.fleet.instance == first.instance
            # Traffic goes to both schedulers: either may run the plan that reads it.
            await until(lambda: first.fleet.gateways() and second.fleet.gateways(), 3.0)

            # The watched scheduler dies: the gateway moves to the other one at once and the
            # replica stays routable throughout.
            port = first.port
            await first.stop(grace=0)
            took = await until(
                lambda: link.connected and link.watching == addresses[1], 5.0, "failed over"
            )
            print(f"the gateway watched the other scheduler {took * 1000:.0f} ms after the kill")
            assert took < 2 * interval + 1.0
            assert gateway.deployments.fleet.instance == second.instance
            assert dep.replicas["r-eu-0"].healthy
            async with http.post(gateway.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200 and r.headers["x-spillway-target"] == "r-eu-0"

            # The first comes back: it gets traffic again, but the watch stays where it works.
            back = await start_scheduler(listen=f"127.0.0.1:{port}")
            await until(lambda: back.fleet.gateways(), 5.0, "traffic to the restarted one")
            sessions = link.sessions
            await asyncio.sleep(10 * interval)
            assert link.watching == addresses[1] and link.sessions == sessions

            # Now the second dies: the watch goes back to the first.
            await second.stop(grace=0)
            await until(lambda: link.connected and link.watching == addresses[0], 5.0)
            assert gateway.deployments.fleet.instance == back.instance
            assert dep.replicas["r-eu-0"].healthy
    finally:
        await gateway.stop()


async def test_a_drain_run_by_the_scheduler_not_watched_still_reaches_the_gateway(
    start_scheduler: SchedulerFactory,
    tokens: Tokens,
    tmp_path: Path,
    replicas: ReplicaFactory,
    gateway_config: Callable[..., GatewayConfig],
) -> None:
    """The drain mark lives in the fleet state of the scheduler whose worker drains."""
    token = tokens.add("gw-1", "gateway")
    watched = await start_scheduler()
    other = await start_scheduler()
    (replica,) = await replicas("r-eu-0", extra=("--speedup", "50"))
    config = gateway_config({"chat": deployment()}, Address(token, watched.port))
    section = config.scheduler.model_copy(
        update={
            "address": None,
            "addresses": [f"127.0.0.1:{s.port}" for s in (watched, other)],
        }
    )
    gateway = Gateway(config.model_copy(update={"scheduler": section}))
    await gateway.start()
    try:
        async with reporting(watched, tokens, tmp_path, replica, also=other):
            dep = gateway.deployments.by_name["chat"]
            await until(lambda: "r-eu-0" in dep.replicas and dep.replicas["r-eu-0"].healthy)
            assert gateway.link.state.watching == f"127.0.0.1:{watched.port}"
            await until(lambda: other.fleet.mark_draining("r-eu-0"), 5.0)
            took = await until(lambda: not dep.replicas["r-eu-0"].healthy, 3.0, "drain seen")
            print(f"a drain on the other scheduler reached the gateway in {took * 1000:.0f} ms")
            assert dep.replicas["r-eu-0"].target(0.0, 0.0).accepting is False
            # The watched scheduler itself knows nothing of it.
            assert "r-eu-0" not in watched.fleet.draining()
    finally:
        await gateway.stop()
