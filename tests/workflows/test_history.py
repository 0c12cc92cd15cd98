"""The deployment workflow keeps its history short: after ``ticks_per_history`` ticks (100
unless its input says otherwise) it continues as new, carrying what it knows, so that another
scheduler's worker replays little when the one that had it cached dies."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import Client, WorkflowExecutionStatus

from tests.workflows.conftest import ControlPlaneHarness, eventually_async
from tests.workflows.test_reserved import policy
from workflows.deployment import TICKS_PER_HISTORY, DeploymentWorkflow, workflow_id
from workflows.types import DeploymentInput

PER_RUN = 5


async def test_a_long_running_deployment_continues_as_new_with_its_state(
    control: ControlPlaneHarness, tmp_path: Path
) -> None:
    assert TICKS_PER_HISTORY <= 100
    name = control.name("chat")
    weights = tmp_path / "model"
    weights.mkdir()
    data = policy(name, f"reserved-{control.suffix}", weights)
    data["deployments"][name]["min_replicas"] = 0
    control.write_policy(data)
    # Started before the control plane, which then finds it running (USE_EXISTING).
    client = await Client.connect(control.temporal_address)
    handle = await client.start_workflow(
        DeploymentWorkflow.run,
        DeploymentInput(name, ticks_per_history=PER_RUN),
        id=workflow_id(name),
        task_queue=control.task_queue,
    )
    first = handle.result_run_id
    assert first is not None
    host = await control.start(decide_every_s=0.05)

    async def runs() -> int:
        return (await host.status(name)).ticks // PER_RUN

    async def continued_twice() -> bool:
        return await runs() >= 2

    await eventually_async(continued_twice, within_s=60)
    old = await client.get_workflow_handle(workflow_id(name), run_id=first).describe()
    assert old.status is WorkflowExecutionStatus.CONTINUED_AS_NEW
    now = await client.get_workflow_handle(workflow_id(name)).describe()
    assert now.run_id != first and now.status is WorkflowExecutionStatus.RUNNING
    status = await host.status(name)
    # Each run counts only its own PER_RUN ticks: the total is carried over from run to run.
    assert status.ticks >= 2 * PER_RUN, status
