"""``spillway scheduler run``: serve until SIGTERM or SIGINT, then stop gracefully.

With a ``policy_file`` (and ``temporal``) in the config the same process also hosts the
control plane: the Temporal worker that runs the workflows and control activities, and the
policy store that reloads the policy when it changes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scheduler.auth import TokenStore
from scheduler.config import load_scheduler_config
from scheduler.server import Scheduler

log = logging.getLogger(__name__)


async def run_scheduler(config_path: Path, interceptors: Sequence[Any] = ()) -> None:
    """Serve until told to stop. ``interceptors`` reach the Temporal worker (tests)."""
    config = load_scheduler_config(config_path)
    if config.policy_file is not None:
        # Imported before the gRPC server starts: importing blocks the event loop for a second
        # or two, and agents re-registering with a restarted scheduler must not wait for it.
        from spillway.serve.control_plane import start_control_plane
    scheduler = Scheduler(config, TokenStore(config.tokens_file))
    await scheduler.start()
    host: Any = None
    watch: asyncio.Task[None] | None = None
    try:
        if config.policy_file is not None:
            host, store = await start_control_plane(
                config,
                scheduler.fleet,
                f"127.0.0.1:{scheduler.port}",
                interceptors=interceptors,
            )
            scheduler.service.policy_store = store
            watch = asyncio.create_task(store.watch(config.policy_reload_every_s))
            log.info(
                "control plane on task queue %s at %s, policy %s (%s)",
                config.temporal.task_queue if config.temporal else "-",
                config.temporal.address if config.temporal else "-",
                config.policy_file,
                store.digest,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if watch is not None:
            watch.cancel()
        if host is not None:
            await host.stop()
        await scheduler.stop()
