"""``spillway agent run``: load the config, find the GPUs, supervise replicas, report, and carry
out node-local actions until told to stop.

The node worker runs only when the config has a ``temporal`` section; the files that section
names (CA, client certificate and key, API key) are read before anything starts, and one that
cannot be read stops the agent with one line naming the setting. A frontend that refuses the
node worker later is logged once and the agent goes on serving (see ``agent.worker``). On exit
the replicas keep running (``runtime.on_exit: keep``, the default) for the next agent process
to adopt, or are stopped (``stop``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_agent_config
from agent.gpus import GpuDiscoveryError, GpuInfo, discover
from agent.reporter import Reporter
from agent.supervisor import ReplicaError, ReplicaSpec, Supervisor, SupervisorSettings
from common import __version__
from common.configfile import CredentialError, InputError, read_secret_line
from common.schedulerlink import read_token
from common.temporallink import connect_options

log = logging.getLogger("agent")


class StartupError(InputError):
    """The agent cannot start; the message says why, for a person."""


def supervisor_settings(config: AgentConfig) -> SupervisorSettings:
    r = config.runtime
    api_key = None
    if r.api_key_file is not None:
        api_key = read_secret_line(r.api_key_file, "replica API key")
    return SupervisorSettings(
        state_dir=config.replica_state_dir,
        host=r.host,
        port_range=r.port_range,
        default_runtime=r.default,
        python=r.python,
        health_interval_s=r.health_interval_s,
        health_failures=r.health_failures,
        start_timeout_s=r.start_timeout_s,
        stop_timeout_s=r.stop_timeout_s,
        drain_timeout_s=r.drain_timeout_s,
        restart_backoff_initial_s=r.restart_backoff_initial_s,
        restart_backoff_max_s=r.restart_backoff_max_s,
        crash_loop_restarts=r.crash_loop_restarts,
        crash_loop_window_s=r.crash_loop_window_s,
        api_key=api_key,
    )


def configured_specs(config: AgentConfig) -> list[ReplicaSpec]:
    return [
        ReplicaSpec(
            replica_id=e.replica_id,
            deployment=e.deployment,
            model_path=str(e.model_path),
            served_model_name=e.served_model_name,
            runtime=e.runtime or "",
            gpu_indices=tuple(e.gpus),
            port=e.port,
            mem_fraction_static=e.mem_fraction_static,
            extra_args=tuple(e.extra_args),
        )
        for e in config.replicas
    ]


ExtraActivities = Callable[[Supervisor], Sequence[Callable[..., Any]]]


def node_activities(supervisor: Supervisor) -> list[Callable[..., Any]]:
    """Every activity the node worker serves. New node-local activities are added here."""
    from agent.activities import NodeActivities
    from agent.prefetch.activity import prefetch_weights

    return [*NodeActivities(supervisor).all(), prefetch_weights]


async def start_supervisor(config: AgentConfig, gpus: Sequence[GpuInfo]) -> Supervisor:
    """A supervisor that has adopted the previous agent's replicas and started the configured
    ones (a configured replica that cannot start is reported failed, with its reason)."""
    supervisor = Supervisor(supervisor_settings(config), gpus)
    await supervisor.adopt()
    for spec in configured_specs(config):
        try:
            supervisor.start(spec)
        except ReplicaError as exc:  # reported as a failed replica; the agent keeps going
            log.error("configured replica %s not started: %s", spec.replica_id, exc)
    return supervisor


async def run_agent(config_path: Path, extra_activities: ExtraActivities | None = None) -> None:
    config = load_agent_config(config_path)
    try:
        token = read_token(config.scheduler.token_file)
        if config.temporal is not None:
            connect_options(config.temporal)  # a bad file is a start-up error, not a retry
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
    supervisor = await start_supervisor(config, inventory.gpus)
    reporter = Reporter(
        config,
        inventory,
        token,
        replicas=supervisor.statuses,
        version=__version__,
        hostname=socket.gethostname(),
    )
    tasks = [asyncio.create_task(reporter.run(), name="reporter")]
    if config.temporal is not None:
        from agent.worker import NodeWorker

        activities = node_activities(supervisor)
        if extra_activities is not None:
            activities += list(extra_activities(supervisor))
        worker = NodeWorker(
            config.temporal,
            config.task_queue,
            activities,
            identity=f"{config.agent_id}@{socket.gethostname()}",
        )
        tasks.append(asyncio.create_task(worker.run(), name="node worker"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopped:
                task.result()  # a task that ended on its own is a bug: surface it
        log.info("agent %s stopping", config.agent_id)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await supervisor.close(stop_replicas=config.runtime.on_exit == "stop")
        inventory.close()
