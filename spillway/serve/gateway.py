"""``spillway gateway run``: load the config and the policy, serve the OpenAI-compatible
endpoint, watch the fleet, until SIGTERM or SIGINT; then stop taking connections and give the
requests in flight ``shutdown_grace_s`` to finish.

The event loop is uvloop's when uvloop is installed (the ``gateway`` extra brings it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from gateway.app import Gateway
from gateway.config import load_gateway_config

log = logging.getLogger("gateway")


async def run_gateway(config_path: Path) -> None:
    config = load_gateway_config(config_path)
    gateway = Gateway(config)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("gateway %s stopping", config.gateway_id)
    finally:
        await gateway.stop()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(config_path: Path) -> None:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(run_gateway(config_path))
