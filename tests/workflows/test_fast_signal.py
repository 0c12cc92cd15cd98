"""The deployment workflow reacts to the gateways' queue on the tick that first sees it.

The real workflow runs on the Temporal dev server; its ``plan_deployment`` activity is the real
``plan_step`` over a fleet held here (one reserved replica with room, free GPUs on a second
reserved agent) whose gateway report the test changes. ``provision`` only records that it ran:
the test is about when the workflow decides, not about machines.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

from decisions.fleetview import FleetSnapshot, GatewayLoad, ReplicaState, ReplicaView
from decisions.planning import plan_step
from decisions.plantypes import PlanInput, PlanOutput
from decisions.policy import Policy
from tests.conftest import eventually
from tests.decisions.test_placement import CATALOG, agent
from workflows.deployment import DeploymentWorkflow
from workflows.types import DeploymentInput, DeploymentStatus, ProvisionInput

TICK_S = 0.5


def policy() -> Policy:
    """A long scale-up window (an hour): only the fast signal can start a replica here."""
    return Policy.model_validate(
        {
            "deployments": {
                "chat": {
                    "model": "m",
                    "weights": "s3://b/m",
                    "sku": "H100-80GB",
                    "gpus": 8,
                    "pools": ["reserved-eu"],
                    "max_replicas": 4,
                    "autoscaling": {"target": 4},
                    "slo": {"ttft_s": 2.0, "saturated_queue_age": 0.25},
                    "spillover": {"scale_up_window_s": 3600, "cool_down_s": 3600},
                }
            }
        }
    )


@dataclass
class Fleet:
    gateway: GatewayLoad = field(default_factory=GatewayLoad)
    #: The number of the plan that first saw the queue, and the replicas each plan started.
    plans: int = 0
    first_queued_plan: int | None = None
    started: dict[str, int] = field(default_factory=dict)


@workflow.defn(name="provision", sandboxed=False)  # this module imports more than a sandbox allows
class RecordingProvision:
    @workflow.run
    async def run(self, params: ProvisionInput) -> str:
        return params.replica_id


async def test_a_queue_older_than_the_slo_starts_a_replica_on_the_next_tick(
    temporal_address: str,
) -> None:
    fleet = Fleet()
    pol = policy()

    @activity.defn(name="plan_deployment")
    async def plan_deployment(request: PlanInput) -> PlanOutput:
        fleet.plans += 1
        number = fleet.plans
        if fleet.gateway.queue_depth and fleet.first_queued_plan is None:
            fleet.first_queued_plan = number
        snap = FleetSnapshot(
            (agent("a", 0), agent("b", 8)),
            (ReplicaView("r0", "chat", "a", ReplicaState.HEALTHY, 4, 0),),
            {"chat": fleet.gateway},
        )
        counter = iter(range(100))

        def new_id() -> str:
            replica_id = f"chat-{number}-{next(counter)}"
            fleet.started[replica_id] = number
            return replica_id

        out = plan_step(
            pol, snap, CATALOG, request, activity.info().started_time.timestamp(), new_id
        )
        out.decide_every_s = TICK_S
        return out

    suffix = uuid.uuid4().hex[:6]
    queue = f"control-{suffix}"
    client = await Client.connect(temporal_address)
    async with Worker(
        client,
        task_queue=queue,
        workflows=[DeploymentWorkflow, RecordingProvision],
        activities=[plan_deployment],
    ):
        handle = await client.start_workflow(
            "deployment",
            DeploymentInput(deployment="chat"),
            id=f"deployment-chat-{suffix}",
            task_queue=queue,
        )
        try:
            await eventually(lambda: fleet.plans >= 3, within_s=20)

            async def state() -> DeploymentStatus:
                status: DeploymentStatus = await handle.query("state", result_type=DeploymentStatus)
                return status

            quiet = await state()
            assert quiet.pending == [] and fleet.started == {}, quiet.reason
            assert quiet.reason.startswith("holding"), quiet.reason

            # Three requests wait at a gateway, the oldest for 0.8 s > 0.25 x 2 s.
            fleet.gateway = GatewayLoad(
                queue_depth=3, oldest_queued_s=0.8, in_flight={"r0": 4}, gateways=1
            )
            await eventually(lambda: bool(fleet.started), within_s=10)
            (replica_id,) = fleet.started
            assert fleet.started[replica_id] == fleet.first_queued_plan  # the very first plan
            for _ in range(100):
                now = await state()
                if any(e.split(" ", 1)[1].startswith("scaling:") for e in now.recent):
                    break  # the workflow has acted on the plan (its last event of the tick)
                await asyncio.sleep(0.05)
            assert [p.replica_id for p in now.pending] == [replica_id]
            assert now.reason.startswith(
                "saturated now: 3 queued at the gateways, the oldest for 0.80s > 0.50s "
                "(0.25 x 2s TTFT); +1"
            ), now.reason
            assert any(f"provisioning {replica_id}: free reserved GPUs" in e for e in now.recent), (
                now.recent
            )
        finally:
            await handle.terminate()
