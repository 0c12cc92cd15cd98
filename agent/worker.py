"""The node worker: a Temporal worker on this agent's task queue (``agent-<agent_id>``).

It carries out the scheduler's node-local actions (start, drain, stop a replica; more can be
registered by passing extra activities). If Temporal cannot be reached it keeps trying with a
capped backoff and never takes the agent down with it: the node goes on serving (fail static).
It registers no workflows: those run in the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

log = logging.getLogger(__name__)


class NodeWorker:
    """Polls ``task_queue`` for activities until :meth:`run` is cancelled."""

    def __init__(
        self,
        address: str,
        namespace: str,
        task_queue: str,
        activities: Sequence[Callable[..., Any]],
        *,
        identity: str | None = None,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self.task_queue = task_queue
        self.activities = list(activities)
        self.identity = identity
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.running = asyncio.Event()  # set while a worker is polling
        self.last_error: str | None = None

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                client = await Client.connect(
                    self.address, namespace=self.namespace, identity=self.identity
                )
                worker = Worker(client, task_queue=self.task_queue, activities=self.activities)
                log.info("node worker polling task queue %s at %s", self.task_queue, self.address)
                attempt = 0
                await self._serve(worker)
                self.last_error = "the worker stopped"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable server, namespace missing, ...
                self.last_error = f"{type(exc).__name__}: {exc}"
            self.running.clear()
            delay = random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * 2**attempt))
            attempt = min(attempt + 1, 30)
            log.warning(
                "node worker cannot use Temporal at %s (%s); retrying in %.1fs",
                self.address,
                self.last_error,
                delay,
            )
            await asyncio.sleep(delay)

    async def _serve(self, worker: Worker) -> None:
        task = asyncio.create_task(worker.run())
        self.running.set()
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker.shutdown(), timeout=10)
            raise
        finally:
            self.running.clear()
