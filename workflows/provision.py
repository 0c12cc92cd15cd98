"""The provision workflow: one new replica of a deployment, on reserved GPUs or a rented machine.

For a cloud placement it first starts a stopped machine of the deployment's warm pool, when one
fits (``start_warm_machine``; its disk still holds the weights, so the prefetch finds them
complete), and otherwise walks the offers it was given, in order: launch with an idempotency
key derived from its own workflow id and the offer's position (so a retried or replayed launch
finds the machine the first attempt created), and on a capacity, quota or SKU error moves to
the next offer. Then it waits for the machine's agent to register, prefetches the weights and
starts the replica on the agent's own task queue, and waits until the fleet shows the replica
healthy. When a step after the launch fails it terminates the machine it created
(compensation) before failing; on reserved GPUs it stops the replica it started.

Every outcome is reported to the deployment workflow that started it (a signal), which is how
that workflow stops counting the replica as pending. The result lists every offer tried and
why it was left, for the Temporal UI.

Workflow code: deterministic, no I/O; activities do the work.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from decisions.plantypes import Timeouts
    from workflows.types import (
        TRY_NEXT_OFFER,
        LaunchInput,
        LaunchOutput,
        PrefetchWeightsArgs,
        ProvisionInput,
        ProvisionResult,
        StartReplicaArgs,
        StopReplicaArgs,
        TerminateInput,
        WaitAgentInput,
        WaitAgentOutput,
        WaitReplicaInput,
        WarmStartInput,
        WarmStartOutput,
    )

#: Retries of control-plane steps: transient failures only (the rest are non-retryable).
STEADY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=20,
)
#: Node steps: the node may restart under us; a few tries, then give up and compensate.
NODE = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=20),
    maximum_attempts=5,
)
#: Terminating must eventually succeed: never give up on it.
FOREVER = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=2))


class StepFailed(Exception):
    """A step the provision cannot get past; its message is the reason."""


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(type, message) of an activity or child failure, for decisions and for people."""
    cause = exc.__cause__ if isinstance(exc, ActivityError) else exc
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    if isinstance(cause, TimeoutError):
        return "Timeout", f"timed out ({cause.type.name if cause.type else 'unknown'})"
    return type(cause).__name__, str(cause)


def weights_destination(weights_dir: str, deployment: str, weights: str) -> str:
    """Where a deployment's weights go on a node: one directory per source."""
    digest = hashlib.sha256(weights.encode()).hexdigest()[:12]
    return f"{weights_dir.rstrip('/')}/{deployment}/{digest}"


def node_queue(agent_id: str) -> str:
    return f"agent-{agent_id}"


@workflow.defn(name="provision")
class ProvisionWorkflow:
    def __init__(self) -> None:
        self.step = "starting"

    @workflow.query(name="step")
    def current_step(self) -> str:
        return self.step

    @workflow.run
    async def run(self, params: ProvisionInput) -> ProvisionResult:
        result = ProvisionResult(
            params.replica_id, ok=False, workflow_id=workflow.info().workflow_id
        )
        try:
            if params.where == "cloud":
                await self._on_cloud(params, result)
            else:
                result.agent_id = params.agent_id
                await self._on_reserved(params, result)
            result.ok = True
            self.step = "serving"
        except StepFailed as exc:
            result.error = str(exc)
            self.step = f"failed: {exc}"
        await self._tell_parent(params.parent_id, result)
        return result

    async def _on_cloud(self, params: ProvisionInput, result: ProvisionResult) -> None:
        t = params.timeouts
        launched = None
        # Provisions started before the warm pool existed replay without this step.
        if workflow.patched("warm-pool-start"):
            launched = await self._start_warm(params, result)
        if launched is None:
            launched = await self._launch(params, result)
        try:
            self.step = f"waiting for the agent on {launched.instance_id}"
            agent = await workflow.execute_activity(
                "wait_for_agent",
                WaitAgentInput(launched.key, t.register_s),
                result_type=WaitAgentOutput,
                start_to_close_timeout=timedelta(seconds=t.register_s + 60),
                heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
                retry_policy=STEADY,
            )
            result.agent_id = agent.agent_id
            gpus = agent.gpu_indices[: params.template.gpus]
            if len(gpus) < params.template.gpus:
                raise StepFailed(
                    f"agent {agent.agent_id} has {len(agent.gpu_indices)} GPUs, the replica "
                    f"needs {params.template.gpus}"
                )
            await self._start(params, agent.agent_id, gpus, result)
        except (ActivityError, StepFailed) as exc:
            reason = str(exc) if isinstance(exc, StepFailed) else ": ".join(describe_failure(exc))
            result.attempts.append(f"after launch: {reason}; terminating {launched.instance_id}")
            self.step = f"compensating: terminating {launched.instance_id}"
            await workflow.execute_activity(
                "terminate_instance",
                TerminateInput(launched.cloud, launched.key, f"provision failed: {reason}"),
                start_to_close_timeout=timedelta(minutes=15),
                heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
                retry_policy=FOREVER,
            )
            raise StepFailed(reason) from None

    async def _start_warm(
        self, params: ProvisionInput, result: ProvisionResult
    ) -> LaunchOutput | None:
        """A stopped machine of the deployment's warm pool, started again; None when there is
        none to start (then a new one is launched)."""
        self.step = "starting a stopped machine of the warm pool"
        try:
            warm = await workflow.execute_activity(
                "start_warm_machine",
                WarmStartInput(params.template.deployment, workflow.info().workflow_id),
                result_type=WarmStartOutput,
                start_to_close_timeout=timedelta(minutes=20),
                heartbeat_timeout=timedelta(seconds=params.timeouts.heartbeat_s),
                retry_policy=STEADY,
            )
        except ActivityError as exc:
            result.attempts.append("warm pool: " + ": ".join(describe_failure(exc)))
            return None
        if warm.note:
            result.attempts.append(f"warm pool: {warm.note}")
        machine: LaunchOutput | None = warm.machine
        if machine is None:
            return None
        result.cloud = machine.cloud
        result.key = machine.key
        result.instance_type = machine.instance_type
        result.region = machine.region
        result.usd_per_hour = warm.usd_per_hour
        result.warm = True
        return machine

    async def _launch(self, params: ProvisionInput, result: ProvisionResult) -> LaunchOutput:
        t = params.timeouts
        base = workflow.info().workflow_id
        for index, offer in enumerate(params.offers):
            key = f"{base}.{index}"
            self.step = f"launching {offer.describe()}"
            try:
                launched = await workflow.execute_activity(
                    "launch_instance",
                    LaunchInput(params.template.deployment, key, offer),
                    result_type=LaunchOutput,
                    start_to_close_timeout=timedelta(minutes=20),
                    heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
                    retry_policy=STEADY,
                )
            except ActivityError as exc:
                kind, message = describe_failure(exc)
                result.attempts.append(f"{offer.describe()}: {kind}: {message}")
                if kind in TRY_NEXT_OFFER:
                    continue
                raise StepFailed(f"{offer.describe()}: {kind}: {message}") from None
            result.attempts.append(f"{offer.describe()}: launched {launched.instance_id}")
            result.cloud = launched.cloud
            result.key = launched.key
            result.instance_type = launched.instance_type
            result.region = launched.region
            result.usd_per_hour = offer.usd_per_hour
            return launched  # type: ignore[no-any-return]
        raise StepFailed(
            f"none of {len(params.offers)} offers could be launched"
            if params.offers
            else "no offer to launch"
        )

    async def _on_reserved(self, params: ProvisionInput, result: ProvisionResult) -> None:
        try:
            await self._start(params, params.agent_id, params.gpu_indices, result)
        except (ActivityError, StepFailed) as exc:
            reason = str(exc) if isinstance(exc, StepFailed) else ": ".join(describe_failure(exc))
            result.attempts.append(f"on {params.agent_id}: {reason}; stopping the replica")
            self.step = "compensating: stopping the replica"
            try:
                await workflow.execute_activity(
                    "stop_replica",
                    StopReplicaArgs(params.replica_id),
                    task_queue=node_queue(params.agent_id),
                    schedule_to_start_timeout=timedelta(seconds=60),
                    start_to_close_timeout=timedelta(minutes=5),
                    retry_policy=NODE,
                )
            except ActivityError as stop_exc:
                result.attempts.append("stop failed: " + ": ".join(describe_failure(stop_exc)))
            raise StepFailed(reason) from None

    async def _start(
        self, params: ProvisionInput, agent_id: str, gpus: list[int], result: ProvisionResult
    ) -> None:
        t: Timeouts = params.timeouts
        template = params.template
        queue = node_queue(agent_id)
        if template.weights.startswith("/"):
            model_path = template.weights
        else:
            model_path = weights_destination(
                params.weights_dir, template.deployment, template.weights
            )
            self.step = f"prefetching {template.weights} onto {agent_id}"
            await workflow.execute_activity(
                "prefetch_weights",
                PrefetchWeightsArgs(
                    source=template.weights,
                    destination=model_path,
                    endpoint_url=params.weights_endpoint_url or None,
                ),
                task_queue=queue,
                schedule_to_start_timeout=timedelta(seconds=t.register_s),
                start_to_close_timeout=timedelta(seconds=t.prefetch_s),
                heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
                retry_policy=NODE,
            )
            result.attempts.append(f"weights on {agent_id} at {model_path}")
        self.step = f"starting {params.replica_id} on {agent_id}"
        await workflow.execute_activity(
            "start_replica",
            StartReplicaArgs(
                replica_id=params.replica_id,
                deployment=template.deployment,
                model_path=model_path,
                gpu_indices=gpus,
                served_model_name=template.model,
                runtime=template.runtime,
                extra_args=template.runtime_args,
                healthy_timeout_s=t.start_s,
            ),
            task_queue=queue,
            schedule_to_start_timeout=timedelta(seconds=t.register_s),
            start_to_close_timeout=timedelta(seconds=t.start_s + 60),
            heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
            retry_policy=NODE,
        )
        self.step = f"waiting for {params.replica_id} to report healthy"
        await workflow.execute_activity(
            "wait_for_replica",
            WaitReplicaInput(agent_id, params.replica_id, max(60.0, t.heartbeat_s * 4)),
            start_to_close_timeout=timedelta(seconds=max(60.0, t.heartbeat_s * 4) + 60),
            heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
            retry_policy=STEADY,
        )
        result.attempts.append(f"{params.replica_id} serving on {agent_id}")

    async def _tell_parent(self, parent_id: str, result: ProvisionResult) -> None:
        if not parent_id:
            return
        try:
            await workflow.get_external_workflow_handle(parent_id).signal(
                "provision_finished", result
            )
        except Exception as exc:  # the deployment workflow is gone: nobody to tell
            workflow.logger.warning("cannot tell %s about %s: %s", parent_id, result, exc)
