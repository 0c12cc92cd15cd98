"""The agent's config file: who the agent is, where the scheduler is, and which GPUs it has.

Read from YAML with ``SPILLWAY_AGENT_*`` environment overrides (``__`` separates nested keys,
e.g. ``SPILLWAY_AGENT_SCHEDULER__ADDRESS``). Secrets are never written here: the bearer token is
read from ``scheduler.token_file``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spillway.configfile import load_model, resolve_path

ENV_PREFIX = "SPILLWAY_AGENT_"
AGENT_ID_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_host_port(value: str) -> str:
    """Accept ``host:port`` (``[v6]:port`` for IPv6) with a port in 1..65535."""
    match = _HOST_PORT.match(value)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError("expected host:port, e.g. scheduler.internal:50051")
    return value


class ClientTls(Strict):
    """TLS towards the scheduler. With ``cert_file`` and ``key_file`` it is mutual TLS."""

    ca_file: Path = Field(description="CA bundle that signed the scheduler's certificate.")
    cert_file: Path | None = Field(default=None, description="Client certificate for mTLS.")
    key_file: Path | None = Field(default=None, description="Client private key for mTLS.")
    server_name: str | None = Field(
        default=None, description="Name to check the scheduler's certificate against."
    )

    @model_validator(mode="after")
    def _pair(self) -> ClientTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class SchedulerEndpoint(Strict):
    address: str = Field(description="host:port of the scheduler's gRPC endpoint.")
    token_file: Path = Field(description="File holding this agent's bearer token.")
    tls: ClientTls | None = None

    _check_address = field_validator("address")(check_host_port)


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


class Reconnect(Strict):
    """Jittered exponential backoff between attempts to reach the scheduler."""

    initial_backoff_s: float = Field(default=0.5, gt=0, le=60)
    max_backoff_s: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _order(self) -> Reconnect:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")
        return self


class AgentConfig(Strict):
    agent_id: str = Field(pattern=AGENT_ID_PATTERN, description="Unique id of this agent.")
    scheduler: SchedulerEndpoint
    labels: Labels
    gpus: GpuDiscovery = Field(default_factory=GpuDiscovery)
    reconnect: Reconnect = Field(default_factory=Reconnect)

    @property
    def task_queue(self) -> str:
        """The Temporal task queue of this agent's node worker."""
        return f"agent-{self.agent_id}"


def load_agent_config(path: Path | str) -> AgentConfig:
    """Load and validate an agent config file; relative paths are relative to the file."""
    path = Path(path)
    config = load_model(path, AgentConfig, env_prefix=ENV_PREFIX)
    base = path.resolve().parent
    endpoint = config.scheduler
    endpoint.token_file = resolve_path(base, endpoint.token_file) or endpoint.token_file
    if endpoint.tls is not None:
        tls = endpoint.tls
        tls.ca_file = resolve_path(base, tls.ca_file) or tls.ca_file
        tls.cert_file = resolve_path(base, tls.cert_file)
        tls.key_file = resolve_path(base, tls.key_file)
    return config
