"""The deployment workflow: one per deployment of the policy, running as long as it is there.

Every tick (the report interval, or at once when the policy changes) it asks
``plan_deployment`` what to do: the activity reads the live fleet and the policy in force and
runs the pure autoscaling and placement functions, with the load samples, the overflow
episodes and the release bookkeeping this workflow keeps (they survive crashes and
continue-as-new, so a restart resets neither a scale-up window nor what episodes have lasted). It
then starts a provision child for each new replica and a release child for each replica to
give back, and counts them as pending until they signal their outcome. Children outlive a
continue-as-new of this workflow (parent close policy ABANDON) and report to the workflow id,
which stays the same.

A lock no offer can satisfy is reported once (``state`` query, workflow log) instead of being
retried on every tick; a failed provision holds new provisions back for the failure back-off.

Workflow code: deterministic, no I/O.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from decisions.plantypes import PendingReplica, PlanInput, PlanOutput, trim_samples
    from workflows.types import (
        DeploymentInput,
        DeploymentStatus,
        PolicyChanged,
        ProvisionInput,
        ProvisionResult,
        ReleaseInput,
        ReleaseResult,
    )

#: Ticks per run before continuing as new (or sooner when Temporal suggests it). A short
#: history is cheap to replay, which is what another scheduler's worker does when the one that
#: had this workflow cached dies: 100 ticks replay in a fraction of a second, 500 took seconds.
TICKS_PER_HISTORY = 100
#: What runs started before the change keep (their histories were written with it).
TICKS_PER_HISTORY_BEFORE = 500
RECENT_EVENTS = 40
PLAN_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500), maximum_interval=timedelta(seconds=10)
)


def workflow_id(deployment: str) -> str:
    return f"deployment-{deployment}"


@workflow.defn(name="deployment")
class DeploymentWorkflow:
    def __init__(self) -> None:
        self.status = DeploymentStatus(deployment="")
        self.wake = False
        self.last_lock_error = ""
        self.failure_backoff_s = 60.0

    # -- what people and other workflows see --------------------------------------------------

    @workflow.query(name="state")
    def state(self) -> DeploymentStatus:
        return self.status

    @workflow.signal(name="policy_changed")
    def policy_changed(self, change: PolicyChanged) -> None:
        self._event(f"policy {change.digest} in force")
        self.wake = True

    @workflow.signal(name="provision_finished")
    def provision_finished(self, result: ProvisionResult) -> None:
        self.status.pending = [p for p in self.status.pending if p.replica_id != result.replica_id]
        if result.ok:
            where = (
                f"{result.cloud} {result.instance_type} in {result.region}"
                if result.cloud
                else (f"reserved agent {result.agent_id}")
            )
            self._event(f"{result.replica_id} serving on {where}")
        else:
            self._event(f"{result.replica_id} not provisioned: {result.error}")
            self.status.hold_until = self._now() + self.failure_backoff_s
        self.wake = True

    @workflow.signal(name="release_finished")
    def release_finished(self, result: ReleaseResult) -> None:
        self.status.releasing = [r for r in self.status.releasing if r != result.replica_id]
        self.status.released = [*self.status.released, result.replica_id][-RECENT_EVENTS:]
        machine = result.machine or (
            "machine terminated" if result.terminated else "no machine to give back"
        )
        self._event(f"{result.replica_id} released ({result.drained}; {machine})")
        self.wake = True

    # -- the loop ----------------------------------------------------------------------------

    @workflow.run
    async def run(self, params: DeploymentInput) -> str:
        s = self.status
        s.deployment = params.deployment
        s.pending = list(params.pending)
        s.releasing = list(params.releasing)
        s.released = list(params.released)
        s.hold_until = params.hold_until
        s.recent = list(params.recent)
        s.ticks = params.runs
        samples = list(params.samples)
        last_change_at = params.last_change_at
        carried = PlanOutput(
            exists=True,
            now=0.0,
            episode_started_at=params.episode_started_at,
            episode_seen_at=params.episode_seen_at,
            episodes_s=list(params.episodes_s),
            cheaper_since=list(params.cheaper_since),
        )
        for _ in range(TICKS_PER_HISTORY_BEFORE):
            plan = await workflow.execute_activity(
                "plan_deployment",
                PlanInput(
                    params.deployment,
                    samples,
                    last_change_at,
                    list(s.pending),
                    [*s.releasing, *s.released],
                    s.hold_until,
                    episode_started_at=carried.episode_started_at,
                    episode_seen_at=carried.episode_seen_at,
                    episodes_s=list(carried.episodes_s),
                    cheaper_since=list(carried.cheaper_since),
                ),
                result_type=PlanOutput,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=PLAN_RETRY,
            )
            s.ticks += 1
            if not plan.exists:
                self._event("the deployment left the policy; this workflow ends")
                await workflow.wait_condition(workflow.all_handlers_finished)
                return "the deployment left the policy"
            self.failure_backoff_s = plan.failure_backoff_s
            carried = plan
            if plan.sample is not None:
                samples.append(plan.sample)
            samples = trim_samples(samples, plan.now - plan.window_s)
            self._observe(plan)
            changed = await self._act(plan)
            if changed:
                last_change_at = plan.now
            self._expire_pending(plan)
            self.wake = False
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: self.wake, timeout=plan.decide_every_s)
            if workflow.info().is_continue_as_new_suggested():
                break
            per_run = params.ticks_per_history or TICKS_PER_HISTORY
            if s.ticks - params.runs >= per_run and workflow.patched("short-history"):
                break
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            DeploymentInput(
                deployment=params.deployment,
                samples=samples,
                last_change_at=last_change_at,
                pending=s.pending,
                releasing=s.releasing,
                hold_until=s.hold_until,
                recent=s.recent,
                runs=s.ticks,
                ticks_per_history=params.ticks_per_history,
                released=s.released,
                episode_started_at=carried.episode_started_at,
                episode_seen_at=carried.episode_seen_at,
                episodes_s=carried.episodes_s,
                cheaper_since=carried.cheaper_since,
            )
        )

    def _observe(self, plan: PlanOutput) -> None:
        s = self.status
        s.policy_digest = plan.policy_digest
        s.current = plan.current
        s.desired = plan.desired
        s.reason = plan.reason
        s.signal = plan.sample.value if plan.sample is not None else None
        s.notes = plan.notes
        if plan.lock_error:
            s.lock_error = plan.lock_error
            if plan.lock_error != self.last_lock_error:
                workflow.logger.error("%s: %s", s.deployment, plan.lock_error)
                self._event(f"cannot place: {plan.lock_error}")
                self.last_lock_error = plan.lock_error
        elif plan.starts or plan.desired < plan.current:
            # Placed something, or no longer wants more: the error no longer holds.
            s.lock_error = ""
            self.last_lock_error = ""

    async def _act(self, plan: PlanOutput) -> bool:
        s = self.status
        me = workflow.info().workflow_id
        changed = False
        for release in plan.releases:
            if release.replica_id in s.releasing or release.replica_id in s.released:
                continue
            s.releasing.append(release.replica_id)
            # Started by an earlier run of this workflow already: it reports here all the same.
            with contextlib.suppress(WorkflowAlreadyStartedError):
                await workflow.start_child_workflow(
                    "release",
                    ReleaseInput(me, s.deployment, release, plan.timeouts),
                    id=f"release-{release.replica_id}",
                    parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                )
            self._event(f"releasing {release.replica_id}: {release.reason}")
            changed = True
        assert plan.template is not None
        for start in plan.starts:
            child = f"provision-{start.replica_id}"
            s.pending.append(
                PendingReplica(
                    start.replica_id,
                    child,
                    start.where,
                    start.agent_id,
                    start.gpu_indices,
                    start.offers[0].usd_per_hour if start.offers else 0.0,
                    since=plan.now,
                )
            )
            await workflow.start_child_workflow(
                "provision",
                ProvisionInput(
                    parent_id=me,
                    replica_id=start.replica_id,
                    template=plan.template,
                    where=start.where,
                    agent_id=start.agent_id,
                    gpu_indices=start.gpu_indices,
                    offers=start.offers,
                    timeouts=plan.timeouts,
                    weights_dir=plan.weights_dir,
                    weights_endpoint_url=plan.weights_endpoint_url,
                ),
                id=child,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            )
            self._event(f"provisioning {start.replica_id}: {start.reason}")
            changed = True
        if changed:
            self._event(f"scaling: {plan.reason}")
        return changed

    def _expire_pending(self, plan: PlanOutput) -> None:
        """Forget a pending replica whose provision can no longer be running (its report lost)."""
        t = plan.timeouts
        limit = t.register_s + t.prefetch_s + t.start_s + 600
        kept = []
        for p in self.status.pending:
            if p.since and plan.now - p.since > limit:
                self._event(f"{p.replica_id}: no outcome after {limit:.0f}s; no longer counted")
            else:
                kept.append(p)
        self.status.pending = kept

    def _event(self, text: str) -> None:
        stamp = workflow.now().strftime("%H:%M:%S")
        self.status.recent = [*self.status.recent, f"{stamp} {text}"][-RECENT_EVENTS:]

    def _now(self) -> float:
        return workflow.now().timestamp()
