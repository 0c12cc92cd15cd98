"""``spillway agent run``: load the config, find the GPUs, and report until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path

from agent.channel import read_token
from agent.config import load_agent_config
from agent.gpus import GpuDiscoveryError, discover
from agent.reporter import Reporter
from spillway import __version__
from spillway.configfile import CredentialError, InputError

log = logging.getLogger("agent")


class StartupError(InputError):
    """The agent cannot start; the message says why, for a person."""


async def run_agent(config_path: Path) -> None:
    config = load_agent_config(config_path)
    try:
        token = read_token(config.scheduler.token_file)
    except CredentialError as exc:
        raise StartupError(str(exc)) from exc
    try:
        inventory = discover(config.gpus, config.agent_id)
    except GpuDiscoveryError as exc:
        raise StartupError(f"{config_path}: gpus.discovery is 'nvml' but {exc}") from exc
    log.info(
        "agent %s (%s %s/%s pool %s) found %d GPUs via %s",
        config.agent_id,
        config.labels.provider,
        config.labels.region,
        config.labels.zone or "-",
        config.labels.pool,
        len(inventory.gpus),
        inventory.source,
    )
    reporter = Reporter(
        config, inventory, token, version=__version__, hostname=socket.gethostname()
    )
    task = asyncio.create_task(reporter.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("agent %s stopping", config.agent_id)
    finally:
        inventory.close()
