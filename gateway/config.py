"""The gateway's config file: who the gateway is, where it listens, where the scheduler and the
policy are, and how it talks to replicas.

Read from YAML with ``SPILLWAY_GATEWAY_*`` environment overrides (``__`` separates nested keys,
e.g. ``SPILLWAY_GATEWAY_SCHEDULER__ADDRESS``, or ``..._ADDRESSES=a:1,b:2`` for several
schedulers: the gateway reports to all of them and watches the fleet of one at a time). Secrets
are never written here: the gateway's bearer token is read from ``scheduler.token_file``, the
replicas' API key from ``replica_api_key_file``, managed endpoints' keys from the environment
variables the policy names. ``examples/gateway.yaml`` documents every field.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.configfile import resolve_path
from common.schedulerlink import Reconnect, SchedulerEndpoint, load_client_config

ENV_PREFIX = "SPILLWAY_GATEWAY_"
ID_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
_LISTEN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):(\d{1,5})$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_listen(value: str) -> str:
    match = _LISTEN.match(value)
    if match is None or int(match.group(2)) > 65535:
        raise ValueError("expected host:port (port 0 picks a free one), e.g. 0.0.0.0:8000")
    return value


class GatewayConfig(Strict):
    gateway_id: str = Field(
        pattern=ID_PATTERN, description="Unique id of this gateway; its token is bound to it."
    )
    listen: str = Field(default="0.0.0.0:8000", description="HTTP listen address (host:port).")
    policy_file: Path = Field(description="The policy file (the scheduler's); reloaded on change.")
    policy_reload_every_s: float = Field(default=2.0, gt=0, le=3600)
    scheduler: SchedulerEndpoint
    reconnect: Reconnect = Field(default_factory=Reconnect)
    replica_api_key_file: Path | None = Field(
        default=None,
        description="File holding the replicas' API key (SGLang's --api-key), sent as a bearer "
        "token; unset: none is sent.",
    )
    connect_timeout_s: float = Field(
        default=2.0, gt=0, le=120, description="TCP connect to a replica or endpoint, at most."
    )
    read_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=86400,
        description="Silence from an upstream (no byte) this long fails the request.",
    )
    health_probe_interval_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="A replica that refused a connection is probed (/health) this often until "
        "it answers; it takes no requests meanwhile.",
    )
    max_connections: int = Field(
        default=8192, ge=1, le=1_000_000, description="Upstream connections open at most."
    )
    max_body_bytes: int = Field(
        default=64 << 20, ge=1024, le=1 << 30, description="Largest request body accepted."
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, le=3600, description="On SIGTERM, in-flight requests get this long."
    )

    _check_listen = field_validator("listen")(_check_listen)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


def load_gateway_config(path: Path | str) -> GatewayConfig:
    """Load and validate a gateway config; relative paths are relative to the file."""
    path = Path(path)
    config = load_client_config(path, GatewayConfig, env_prefix=ENV_PREFIX)
    base = path.resolve().parent
    config.policy_file = resolve_path(base, config.policy_file) or config.policy_file
    config.scheduler.resolve_paths(base)
    config.replica_api_key_file = resolve_path(base, config.replica_api_key_file)
    return config
