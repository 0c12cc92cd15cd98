"""``spillway scheduler run`` whose Temporal worker kills its own process at chosen points.

``SPILLWAY_TEST_CRASHES`` maps a workflow id to ``ACTIVITY:before`` or ``ACTIVITY:after``: the
first time that workflow's activity reaches the point, the process exits at once (``os._exit``,
no clean-up, like a power cut). "after" means the activity's work is done but its result never
reaches Temporal. A marker file per workflow id in ``SPILLWAY_TEST_CRASH_DIR`` makes each point
fire once across restarts.

Run as ``python -m tests.workflows.crashing_scheduler CONFIG``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from spillway.serve.scheduler import run_scheduler


def _crash_if(point: str) -> None:
    info = activity.info()
    plan: dict[str, str] = json.loads(os.environ.get("SPILLWAY_TEST_CRASHES", "{}"))
    if plan.get(info.workflow_id or "") != point:
        return
    marker = Path(os.environ["SPILLWAY_TEST_CRASH_DIR"]) / f"{info.workflow_id}.crashed"
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.write(fd, point.encode())
    os.fsync(fd)
    os.close(fd)
    print(f"crashing at {point} of {info.workflow_id}", file=sys.stderr, flush=True)
    os._exit(17)


class _Inbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        name = activity.info().activity_type
        _crash_if(f"{name}:before")
        result = await super().execute_activity(input)
        _crash_if(f"{name}:after")
        return result


class CrashAt(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run_scheduler(Path(sys.argv[1]), interceptors=[CrashAt()]))
