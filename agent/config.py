"""The agent's config file: who the agent is, where the scheduler is, and which GPUs it has.

Read from YAML with ``SPILLWAY_AGENT_*`` environment overrides (``__`` separates nested keys,
e.g. ``SPILLWAY_AGENT_SCHEDULER__ADDRESS``; ``SPILLWAY_AGENT_SCHEDULER__ADDRESSES=a:1,b:2`` for
several schedulers, which the agent all reports to). Secrets are never written here: the bearer
token is read from ``scheduler.token_file``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.configfile import resolve_path
from common.schedulerlink import (
    Reconnect,
    SchedulerEndpoint,
    load_client_config,
)
from common.temporallink import TemporalLink, resolve_paths

ENV_PREFIX = "SPILLWAY_AGENT_"
AGENT_ID_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Labels(Strict):
    pool: str = Field(min_length=1, max_length=63, description="Capacity pool of these GPUs.")
    provider: Literal["onprem", "aws", "gcp", "azure", "local"]
    region: str = Field(min_length=1, max_length=63)
    zone: str = Field(default="", max_length=63)
    residency_group: str = Field(default="", max_length=63)
    instance_id: str = Field(default="", max_length=128)
    extra: dict[str, str] = Field(default_factory=dict)


class StaticGpu(Strict):
    """GPUs declared by hand, for machines where NVML is not available."""

    model: str = Field(min_length=1, max_length=128, examples=["NVIDIA H100 80GB HBM3"])
    memory_gib: float = Field(gt=0, le=1024)
    count: int = Field(default=1, ge=1, le=64)


class GpuDiscovery(Strict):
    # auto: NVML when the driver is present, else the static list.
    discovery: Literal["auto", "nvml", "static"] = "auto"
    static: list[StaticGpu] = Field(default_factory=list)

    @model_validator(mode="after")
    def _static_needs_list(self) -> GpuDiscovery:
        if self.discovery == "static" and not self.static:
            raise ValueError("discovery 'static' needs a non-empty 'static' list")
        return self


RUNTIMES = Literal["sglang", "simulated"]


class RuntimeSettings(Strict):
    """How replicas are run and watched on this node."""

    default: RUNTIMES = Field(default="sglang", description="Runtime of replicas that name none.")
    host: str = Field(default="0.0.0.0", min_length=1, description="Where replicas listen.")
    port_range: tuple[int, int] = Field(
        default=(30000, 30999), description="Ports picked for replicas that name none."
    )
    python: str | None = Field(default=None, description="Interpreter that launches replicas.")
    api_key_file: Path | None = Field(
        default=None,
        description="File holding the replicas' API key: every replica starts with SGLang's "
        "--api-key, and the gateways send it (their replica_api_key_file); unset: none.",
    )
    health_interval_s: float = Field(default=2.0, gt=0, le=60)
    health_failures: int = Field(
        default=3, ge=1, le=100, description="Consecutive failed checks before a restart."
    )
    start_timeout_s: float = Field(default=900.0, gt=0, le=86400)
    stop_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    drain_timeout_s: float = Field(default=600.0, gt=0, le=86400)
    restart_backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    restart_backoff_max_s: float = Field(default=60.0, gt=0, le=86400)
    crash_loop_restarts: int = Field(default=3, ge=1, le=1000)
    crash_loop_window_s: float = Field(default=300.0, gt=0, le=86400)
    on_exit: Literal["keep", "stop"] = Field(
        default="keep", description="keep: replicas outlive the agent and are adopted later."
    )

    @model_validator(mode="after")
    def _ranges(self) -> RuntimeSettings:
        first, last = self.port_range
        if not 0 < first <= last < 65536:
            raise ValueError("port_range must be [first, last] with 0 < first <= last < 65536")
        if self.restart_backoff_max_s < self.restart_backoff_initial_s:
            raise ValueError("restart_backoff_max_s must be at least restart_backoff_initial_s")
        return self


class ReplicaEntry(Strict):
    """A replica this agent starts by itself (workflows start the others)."""

    replica_id: str = Field(pattern=AGENT_ID_PATTERN)
    deployment: str = Field(min_length=1, max_length=128)
    model_path: Path = Field(description="Local directory with the weights.")
    served_model_name: str = Field(default="", max_length=256)
    runtime: RUNTIMES | None = None
    gpus: list[int] = Field(default_factory=list, description="GPU indices, e.g. [0, 1].")
    port: int = Field(default=0, ge=0, le=65535, description="0: pick a free port.")
    mem_fraction_static: float | None = Field(default=None, gt=0, lt=1)
    extra_args: list[str] = Field(default_factory=list)


class TemporalEndpoint(TemporalLink):
    """Where the node worker polls for actions, and how it proves who it is (TLS, mutual TLS
    or an API key: ``common.temporallink``); without it the agent only reports."""


def default_state_dir(agent_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "spillway" / agent_id


class AgentConfig(Strict):
    agent_id: str = Field(pattern=AGENT_ID_PATTERN, description="Unique id of this agent.")
    scheduler: SchedulerEndpoint
    labels: Labels
    gpus: GpuDiscovery = Field(default_factory=GpuDiscovery)
    reconnect: Reconnect = Field(default_factory=Reconnect)
    state_dir: Path | None = Field(
        default=None, description="Replica state and logs; default ~/.local/state/spillway/ID."
    )
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    replicas: list[ReplicaEntry] = Field(default_factory=list)
    temporal: TemporalEndpoint | None = None
    advertise_host: str = Field(
        default="",
        max_length=253,
        pattern=r"^[A-Za-z0-9.:_-]*$",
        description="Host name or address at which gateways reach this agent's replicas; "
        "empty: the machine's hostname.",
    )

    @model_validator(mode="after")
    def _replicas_apart(self) -> AgentConfig:
        ids: set[str] = set()
        owner: dict[int, str] = {}
        for entry in self.replicas:
            if entry.replica_id in ids:
                raise ValueError(f"replica id {entry.replica_id} appears twice in replicas")
            ids.add(entry.replica_id)
            for gpu in entry.gpus:
                if gpu in owner:
                    raise ValueError(
                        f"GPU {gpu} is given to both {owner[gpu]} and {entry.replica_id}"
                    )
                owner[gpu] = entry.replica_id
        return self

    @property
    def replica_state_dir(self) -> Path:
        return self.state_dir or default_state_dir(self.agent_id)

    @property
    def task_queue(self) -> str:
        """The Temporal task queue of this agent's node worker."""
        return f"agent-{self.agent_id}"


def load_agent_config(path: Path | str) -> AgentConfig:
    """Load and validate an agent config file; relative paths are relative to the file."""
    path = Path(path)
    config = load_client_config(path, AgentConfig, env_prefix=ENV_PREFIX)
    base = path.resolve().parent
    config.scheduler.resolve_paths(base)
    if config.temporal is not None:
        resolve_paths(config.temporal, base)
    config.state_dir = resolve_path(base, config.state_dir)
    config.runtime.api_key_file = resolve_path(base, config.runtime.api_key_file)
    for entry in config.replicas:
        entry.model_path = resolve_path(base, entry.model_path) or entry.model_path
    return config
