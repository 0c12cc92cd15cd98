"""The release workflow: drain one spilled replica, then give its machine back.

Draining runs on the agent's task queue (stop routing, let in-flight requests finish, SIGTERM).
An agent that no longer polls (its machine died) cannot drain; after a minute the workflow
moves on. Terminating is retried until it succeeds: a machine is never left running because a
cloud API call failed once. Replicas on machines Spillway did not rent (reserved GPUs) are only
drained; placement never releases those to save money.

Workflow code: deterministic, no I/O.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.provision import FOREVER, NODE, describe_failure, node_queue
    from workflows.types import (
        DrainReplicaArgs,
        ReleaseInput,
        ReleaseResult,
        TerminateInput,
    )


@workflow.defn(name="release")
class ReleaseWorkflow:
    @workflow.run
    async def run(self, params: ReleaseInput) -> ReleaseResult:
        release = params.release
        t = params.timeouts
        result = ReleaseResult(release.replica_id, drained="", terminated=False)
        try:
            drained = await workflow.execute_activity(
                "drain_replica",
                DrainReplicaArgs(release.replica_id, t.drain_s),
                result_type=dict,
                task_queue=node_queue(release.agent_id),
                schedule_to_start_timeout=timedelta(seconds=60),
                start_to_close_timeout=timedelta(seconds=t.drain_s + 60),
                heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
                retry_policy=NODE,
            )
            result.drained = str(drained.get("state", "stopped"))
        except ActivityError as exc:
            kind, message = describe_failure(exc)
            result.drained = f"not drained ({kind}: {message})"
        if release.key:
            await workflow.execute_activity(
                "terminate_instance",
                TerminateInput(release.cloud, release.key, release.reason),
                start_to_close_timeout=timedelta(minutes=15),
                heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
                retry_policy=FOREVER,
            )
            result.terminated = True
        result.reason = release.reason
        if params.parent_id:
            try:
                await workflow.get_external_workflow_handle(params.parent_id).signal(
                    "release_finished", result
                )
            except Exception as exc:  # the deployment workflow is gone: nobody to tell
                workflow.logger.warning("cannot tell %s: %s", params.parent_id, exc)
        return result
