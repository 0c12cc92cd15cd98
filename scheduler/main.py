"""``spillway scheduler run``: serve until SIGTERM or SIGINT, then stop gracefully."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from scheduler.auth import TokenStore
from scheduler.config import load_scheduler_config
from scheduler.server import Scheduler


async def run_scheduler(config_path: Path) -> None:
    config = load_scheduler_config(config_path)
    scheduler = Scheduler(config, TokenStore(config.tokens_file))
    await scheduler.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await scheduler.stop()
