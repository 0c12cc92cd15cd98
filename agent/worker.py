"""The node worker: a Temporal worker on this agent's task queue (``agent-<agent_id>``).

It carries out the scheduler's node-local actions (start, drain, stop a replica; more can be
registered by passing extra activities). If Temporal cannot be reached it keeps trying with a
capped backoff and never takes the agent down with it: the node goes on serving (fail static).
It registers no workflows: those run in the control plane.

A frontend that refuses the worker (TLS or API key, :class:`common.temporallink.TemporalRefused`)
or a credential file that cannot be read is a config problem, not an outage, and is logged
once, as one line naming the setting; see :meth:`NodeWorker.run` for why the agent goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from temporalio.worker import Worker

from common.configfile import CredentialError
from common.temporallink import (
    TemporalLink,
    TemporalRefused,
    connect_temporal,
    describe_outage,
    explain,
)

log = logging.getLogger(__name__)


class NodeWorker:
    """Polls ``task_queue`` for activities until :meth:`run` is cancelled."""

    def __init__(
        self,
        link: TemporalLink,
        task_queue: str,
        activities: Sequence[Callable[..., Any]],
        *,
        identity: str | None = None,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.link = link
        self.address = link.address
        self.task_queue = task_queue
        self.activities = list(activities)
        self.identity = identity
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.running = asyncio.Event()  # set while a worker is polling
        self.last_error: str | None = None
        #: The config problem that keeps the worker out (one line), None while none does.
        self.refused: str | None = None
        self._logged: str | None = None

    async def run(self) -> None:
        """Connect, poll, and on any failure wait and connect again, until cancelled.

        An outage (nothing listening, a timeout, a frontend restarting) is retried with the
        usual jittered backoff and logged at each attempt. A refusal (the frontend's
        certificate is not trusted, the client certificate is missing or rejected, the server
        name does not match, the API key is refused) or an unreadable credential file is a
        config error: it is logged once at ERROR, as one line naming the setting, and retried
        at the longest backoff, re-reading the files each time, so that a corrected or renewed
        certificate is picked up without a restart. The agent does not exit on it, because
        exiting would stop its reports too: the scheduler would lose the node's replicas from
        the fleet and the gateways would stop routing to replicas that are serving well (and
        ``runtime.on_exit: stop`` would stop them). Without Temporal the node only loses the
        scheduler's actions, which is what fail static promises; the line in the log, and
        ``refused`` here, say why.
        """
        attempt = 0
        while True:
            refused: str | None = None
            try:
                client = await connect_temporal(
                    self.link, what="the node worker", identity=self.identity
                )
                worker = Worker(client, task_queue=self.task_queue, activities=self.activities)
                log.info("node worker polling task queue %s at %s", self.task_queue, self.address)
                attempt = 0
                self.refused = self._logged = None
                await self._serve(worker)
                self.last_error = "the worker stopped"
            except asyncio.CancelledError:
                raise
            except (TemporalRefused, CredentialError) as exc:
                refused = str(exc)
            except Exception as exc:  # unreachable server, namespace missing, ...
                found = await explain(exc, self.link, what="the node worker")
                refused = str(found) if found is not None else None
                self.last_error = describe_outage(exc, self.link)
            self.running.clear()
            if refused is not None:
                self.last_error = self.refused = refused
                if refused != self._logged:
                    self._logged = refused
                    log.error(
                        "%s (the node worker takes no actions until this is fixed and retries "
                        "every %.0fs; replicas keep serving)",
                        refused,
                        self.max_backoff_s,
                    )
                await asyncio.sleep(self.max_backoff_s)
                continue
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
