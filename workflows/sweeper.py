"""The sweeper: terminates managed machines nobody owns, after a grace period, and warm-pool
machines past their pool's bounds.

Every ``every_s`` it lists the machines carrying Spillway's ownership label on every configured
cloud (``find_machines``), each with its owner: the provision that is launching it, or the
deployment its agent serves. A machine without an owner for ``grace_s`` in a row is a leak (a
crash between launch and bookkeeping, a deployment removed from the policy, an agent that died)
and is terminated. One that finds an owner again is forgiven. A stopped machine of a warm pool is
owned by the pool, never a leak, until ``find_machines`` says it must go (stopped longer than
``max_stopped_s``, beyond ``max_machines``, or its deployment no longer keeps a pool); then it
is terminated at once. The times it first saw each
unowned machine survive restarts and continue-as-new, so the grace period is never reset by a
crash.

Workflow code: deterministic, no I/O.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.provision import FOREVER, STEADY
    from workflows.types import (
        FindMachinesInput,
        FindMachinesOutput,
        SweeperInput,
        SweeperStatus,
        TerminateInput,
    )

RUNS_PER_HISTORY = 200
SWEEPER_ID = "spillway-sweeper"


@workflow.defn(name="sweeper")
class SweeperWorkflow:
    def __init__(self) -> None:
        self.status = SweeperStatus()
        self.wake = False

    @workflow.query(name="state")
    def state(self) -> SweeperStatus:
        return self.status

    @workflow.signal(name="sweep_now")
    def sweep_now(self) -> None:
        self.wake = True

    @workflow.run
    async def run(self, params: SweeperInput) -> None:
        self.status.unowned_since = dict(params.unowned_since)
        self.status.terminated = list(params.terminated)
        for _ in range(RUNS_PER_HISTORY):
            await self._sweep(params.grace_s)
            self.wake = False
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: self.wake, timeout=params.every_s)
        workflow.continue_as_new(
            SweeperInput(
                every_s=params.every_s,
                grace_s=params.grace_s,
                unowned_since=self.status.unowned_since,
                terminated=self.status.terminated[-50:],
                runs=params.runs + RUNS_PER_HISTORY,
            )
        )

    async def _sweep(self, grace_s: float) -> None:
        found = await workflow.execute_activity(
            "find_machines",
            FindMachinesInput(),
            result_type=FindMachinesOutput,
            start_to_close_timeout=timedelta(minutes=5),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=STEADY,
        )
        self.status.errors = found.errors
        now = workflow.now().timestamp()
        unowned = self.status.unowned_since
        seen: set[str] = set()
        # Sweeps started before the warm pool existed replay without its step.
        warm_pool = workflow.patched("warm-pool-expiry")
        for machine in found.machines:
            seen.add(machine.key)
            if warm_pool and machine.expire:
                await self._terminate(machine.cloud, machine.key, machine.expire)
                unowned.pop(machine.key, None)
                self.status.terminated.append(
                    f"{machine.cloud} {machine.key} ({machine.instance_id}): {machine.expire}"
                )
                continue
            if machine.owner:
                unowned.pop(machine.key, None)
                continue
            first = unowned.setdefault(machine.key, now)
            if now - first < grace_s:
                continue
            await self._terminate(
                machine.cloud,
                machine.key,
                f"leak: managed machine {machine.instance_id} in {machine.region} had no "
                f"owner for {now - first:.0f}s",
            )
            unowned.pop(machine.key, None)
            self.status.terminated.append(f"{machine.cloud} {machine.key} ({machine.instance_id})")
        for key in list(unowned):
            if key not in seen:
                del unowned[key]

    async def _terminate(self, cloud: str, key: str, reason: str) -> None:
        await workflow.execute_activity(
            "terminate_instance",
            TerminateInput(cloud, key, reason),
            start_to_close_timeout=timedelta(minutes=15),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=FOREVER,
        )
