"""The release workflow: drain one spilled replica, then give its machine back: terminated, or
stopped into its deployment's warm pool when the policy says ``release: stop``.

First the gateways stop routing to it: ``drain_at_gateways`` (a control activity) shows it
DRAINING in every fleet watch and waits, at most the drain timeout, until no gateway has a
request in flight to it. Then draining runs on the agent's task queue (stop routing, let
in-flight requests finish, SIGTERM). An agent that no longer polls (its machine died) cannot
drain; after a minute the workflow moves on. Giving the machine back (``release_machine``, which
decides from the policy in force whether to stop or terminate it) is retried until it succeeds:
a machine is never left running because a cloud API call failed once. Replicas on machines
Spillway did not rent (reserved GPUs) are only drained; placement never releases those to save
money.

Workflow code: deterministic, no I/O.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.provision import FOREVER, NODE, STEADY, describe_failure, node_queue
    from workflows.types import (
        DrainAtGatewaysInput,
        DrainAtGatewaysOutput,
        DrainReplicaArgs,
        ReleaseInput,
        ReleaseMachineInput,
        ReleaseMachineOutput,
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
        # Releases started before this step existed replay without it.
        if workflow.patched("drain-at-gateways"):
            try:
                gateways = await workflow.execute_activity(
                    "drain_at_gateways",
                    DrainAtGatewaysInput(release.replica_id, t.drain_s),
                    result_type=DrainAtGatewaysOutput,
                    start_to_close_timeout=timedelta(seconds=t.drain_s + 60),
                    heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
                    retry_policy=STEADY,
                )
                result.gateway_in_flight = gateways.in_flight
            except ActivityError as exc:  # the node drain below still lets requests finish
                kind, message = describe_failure(exc)
                workflow.logger.warning(
                    "%s: not drained at the gateways (%s: %s)", release.replica_id, kind, message
                )
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
        if release.key and workflow.patched("warm-pool-release"):
            # Stopped into the warm pool or terminated, as the policy in force says.
            machine = await workflow.execute_activity(
                "release_machine",
                ReleaseMachineInput(
                    release.cloud,
                    release.key,
                    params.deployment,
                    release.replica_id,
                    since=workflow.now().timestamp(),
                    reason=release.reason,
                ),
                result_type=ReleaseMachineOutput,
                start_to_close_timeout=timedelta(minutes=20),
                heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
                retry_policy=FOREVER,
            )
            result.terminated = machine.terminated
            result.stopped = machine.stopped
            result.machine = machine.outcome
        elif release.key:
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
