"""Draining through the gateways: the ``drain_at_gateways`` activity against a real scheduler
(gateways played by the test with real ReportTraffic calls), and the release workflow calling
it before the node drain, on a real Temporal dev server."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from common.v1 import agent_pb2 as pb
from decisions.plantypes import PlannedRelease, Timeouts
from providers.catalog import default_catalog
from scheduler.config import SpillSettings
from scheduler.policystore import PolicyStore
from scheduler.server import Scheduler
from tests.conftest import SchedulerFactory, Tokens, eventually
from tests.scheduler.test_gateway_service import report_traffic, reporting, traffic, watching
from tests.scheduler.test_server import REPLICA
from workflows.activities import ControlActivities, ControlPlane
from workflows.release import ReleaseWorkflow
from workflows.types import (
    DrainAtGatewaysInput,
    DrainAtGatewaysOutput,
    DrainReplicaArgs,
    ReleaseInput,
    ReleaseMachineInput,
    ReleaseMachineOutput,
    ReleaseResult,
)

REPLICA_ID = REPLICA.replica_id


def activities_of(scheduler: Scheduler, tmp_path: Path) -> ControlActivities:
    plane = ControlPlane(
        fleet=scheduler.fleet,
        policies=PolicyStore(tmp_path / "policy.yaml"),  # never loaded: not needed here
        catalog=default_catalog(),
        providers={},
        settings=SpillSettings(),
        decide_every_s=1.0,
    )
    return ControlActivities(plane)


@pytest.fixture
async def serving(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> AsyncIterator[Scheduler]:
    """A scheduler (reports every 0.2 s) with node-a serving one replica, and two gateways'
    tokens."""
    tokens.add("gw-1", "gateway")
    tokens.add("gw-2", "gateway")
    scheduler = await start_scheduler(report_interval_s=0.2)
    async with reporting(scheduler, tokens, tmp_path, "node-a", lambda: (REPLICA,)):
        await eventually(lambda: (r := scheduler.fleet.get("node-a")) is not None and r.report)
        yield scheduler


@contextlib.asynccontextmanager
async def gateways_reporting(
    port: int, tokens: Tokens, in_flight: dict[str, dict[str, int]]
) -> AsyncIterator[None]:
    """Gateways reporting every 50 ms what ``in_flight[gateway_id]`` holds at the time."""

    async def report() -> None:
        while True:
            for gateway_id, targets in in_flight.items():
                await report_traffic(
                    port, tokens.clear[gateway_id], traffic(gateway_id, in_flight=dict(targets))
                )
            await asyncio.sleep(0.05)

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_drain_marks_the_replica_and_returns_when_nothing_is_in_flight(
    serving: Scheduler, tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = serving
    port = scheduler.port
    in_flight = {"gw-1": {REPLICA_ID: 3}, "gw-2": {"other-replica": 5}}
    async with (
        gateways_reporting(port, tokens, in_flight),
        watching(port, tokens.clear["gw-1"]) as watch,
    ):
        await eventually(lambda: len(scheduler.fleet.gateways()) == 2)
        await eventually(lambda: REPLICA_ID in watch.replicas())
        assert watch.replicas()[REPLICA_ID].state == pb.REPLICA_STATE_HEALTHY
        drain = asyncio.create_task(
            ActivityEnvironment().run(
                activities_of(scheduler, tmp_path).drain_at_gateways,
                DrainAtGatewaysInput(REPLICA_ID, deadline_s=30),
            )
        )
        # The gateways are told at once, though the agent still reports the replica healthy.
        took = await eventually(
            lambda: watch.replicas()[REPLICA_ID].state == pb.REPLICA_STATE_DRAINING, within_s=1
        )
        assert took < 0.15
        record = scheduler.fleet.get("node-a")
        assert record is not None and record.report is not None
        assert record.report.replicas[0].state.value == "healthy"
        # The requests in flight at gw-1 finish: 3, then 1, then none.
        await asyncio.sleep(0.3)
        assert not drain.done()
        in_flight["gw-1"][REPLICA_ID] = 1
        await asyncio.sleep(0.3)
        assert not drain.done()
        finished = time.monotonic()
        in_flight["gw-1"][REPLICA_ID] = 0
        done: DrainAtGatewaysOutput = await asyncio.wait_for(drain, 2)
        assert time.monotonic() - finished < 0.5
        assert done == DrainAtGatewaysOutput(REPLICA_ID, in_flight=0, gateways=2, marked=True)
        # The replica stays DRAINING to the gateways until it leaves the fleet.
        await asyncio.sleep(0.3)
        assert watch.replicas()[REPLICA_ID].state == pb.REPLICA_STATE_DRAINING


async def test_drain_gives_up_at_the_deadline_and_forgets_silent_gateways(
    serving: Scheduler, tokens: Tokens, tmp_path: Path
) -> None:
    scheduler = serving
    port = scheduler.port
    activities = activities_of(scheduler, tmp_path)
    # No gateway at all: nothing to wait for.
    started = time.monotonic()
    done = await ActivityEnvironment().run(
        activities.drain_at_gateways, DrainAtGatewaysInput(REPLICA_ID, deadline_s=30)
    )
    assert done == DrainAtGatewaysOutput(REPLICA_ID, in_flight=0, gateways=0, marked=True)
    assert time.monotonic() - started < 0.5

    async def stuck() -> None:  # a gateway whose request to the replica never finishes
        while True:
            await report_traffic(
                port, tokens.clear["gw-1"], traffic("gw-1", in_flight={REPLICA_ID: 2})
            )
            await asyncio.sleep(0.05)

    gateway = asyncio.create_task(stuck())
    try:
        await eventually(lambda: scheduler.fleet.gateways())
        started = time.monotonic()
        done = await ActivityEnvironment().run(
            activities.drain_at_gateways, DrainAtGatewaysInput(REPLICA_ID, deadline_s=1.0)
        )
        assert done.in_flight == 2 and done.gateways == 1
        assert 1.0 <= time.monotonic() - started < 1.6
    finally:
        gateway.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gateway
    # A report sent just before the cancel may still land: let it, so that the gateway's last
    # report comes before the mark below.
    await asyncio.sleep(0.05)
    # The gateway fell silent. Its last report came before the mark, so it is waited for
    # until it has not reported for two intervals (0.4 s); then it no longer counts.
    started = time.monotonic()
    done = await ActivityEnvironment().run(
        activities.drain_at_gateways, DrainAtGatewaysInput("not-in-the-fleet", deadline_s=30)
    )
    assert done == DrainAtGatewaysOutput("not-in-the-fleet", 0, 0, marked=False)
    assert 0.2 <= time.monotonic() - started < 0.8


async def test_release_drains_at_the_gateways_before_the_node(temporal_address: str) -> None:
    calls: list[str] = []

    @activity.defn(name="drain_at_gateways")
    async def drain_at_gateways(request: DrainAtGatewaysInput) -> DrainAtGatewaysOutput:
        calls.append(f"gateways {request.replica_id} {request.deadline_s:g}")
        return DrainAtGatewaysOutput(request.replica_id, in_flight=1, gateways=2, marked=True)

    @activity.defn(name="drain_replica")
    async def drain_replica(request: DrainReplicaArgs) -> dict[str, str]:
        calls.append(f"node {request.replica_id}")
        return {"state": "stopped"}

    @activity.defn(name="release_machine")
    async def release_machine(request: ReleaseMachineInput) -> ReleaseMachineOutput:
        calls.append(f"release {request.key}")
        return ReleaseMachineOutput(request.key, terminated=True, outcome="machine terminated")

    suffix = uuid.uuid4().hex[:6]
    control, agent_id = f"control-{suffix}", f"node-{suffix}"
    client = await Client.connect(temporal_address)
    async with (
        Worker(
            client,
            task_queue=control,
            workflows=[ReleaseWorkflow],
            activities=[drain_at_gateways, release_machine],
        ),
        Worker(client, task_queue=f"agent-{agent_id}", activities=[drain_replica]),
    ):
        result = await client.execute_workflow(
            "release",
            ReleaseInput(
                parent_id="",
                deployment="chat",
                release=PlannedRelease(
                    replica_id=f"chat-{suffix}",
                    agent_id=agent_id,
                    reason="quiet",
                    cloud="aws",
                    key=f"provision-chat-{suffix}.0",
                ),
                timeouts=Timeouts(drain_s=20, heartbeat_s=5),
            ),
            id=f"release-chat-{suffix}",
            task_queue=control,
            result_type=ReleaseResult,
        )
    assert calls == [
        f"gateways chat-{suffix} 20",
        f"node chat-{suffix}",
        f"release provision-chat-{suffix}.0",
    ]
    assert result.gateway_in_flight == 1 and result.drained == "stopped" and result.terminated
