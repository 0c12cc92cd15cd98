"""The sweeper's census (``find_machines``) judges no leak on a fleet view that is not complete:
right after the scheduler starts, and for a machine whose agent registered but has not
reported, every machine counts as owned."""

from __future__ import annotations

import asyncio
import time

from temporalio.testing import ActivityEnvironment

from providers.base import KEY_LABEL
from scheduler.fleet import Gpu, Labels, Registration
from tests.workflows.test_warm_pool_activities import Env, env  # noqa: F401  (fixture)
from workflows.types import FindMachinesInput, FindMachinesOutput


async def census(e: Env) -> dict[str, str]:
    out: FindMachinesOutput = await ActivityEnvironment().run(
        e.activities.find_machines, FindMachinesInput()
    )
    return {m.key: m.owner for m in out.machines}


async def test_no_leak_is_judged_while_the_scheduler_learns_the_fleet(env: Env) -> None:  # noqa: F811
    key = await asyncio.to_thread(env.launch, "r1")
    plane = env.activities.plane
    plane.started_at = time.monotonic()  # just started: agents have not all reported yet
    assert (await census(env))[key].startswith("not known yet: the scheduler started")

    plane.started_at = time.monotonic() - 3600  # long running: an unowned machine is a leak
    assert (await census(env))[key] == ""

    # Its agent registered but has not reported: what it serves is not known yet.
    plane.fleet.register(
        Registration(
            agent_id="spill-1",
            agent_version="1",
            labels=Labels(
                pool="spill", provider="aws", region="eu-north-1", extra={KEY_LABEL: key}
            ),
            gpus=(Gpu(0, "u0", "H100", 80 << 30),),
            gpu_source="static",
            hostname="h",
            task_queue="agent-spill-1",
        )
    )
    assert (await census(env))[key] == "not known yet: agent spill-1 has not reported"
