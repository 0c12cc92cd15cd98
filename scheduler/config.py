"""The scheduler's config file: where it listens, how often agents report, who may talk to it.

Read from YAML with ``SPILLWAY_SCHEDULER_*`` environment overrides (``__`` separates nested keys).
Secrets are never written here: tokens live, hashed, in ``tokens_file``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spillway.configfile import load_model, resolve_path

ENV_PREFIX = "SPILLWAY_SCHEDULER_"
_LISTEN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):(\d{1,5})$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_listen(value: str) -> str:
    match = _LISTEN.match(value)
    if match is None or int(match.group(2)) > 65535:
        raise ValueError("expected host:port (port 0 picks a free one), e.g. 0.0.0.0:50051")
    return value


class ServerTls(Strict):
    """TLS for the gRPC endpoint. With ``client_ca_file`` every client must present a
    certificate signed by that CA (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class SchedulerConfig(Strict):
    listen: str = Field(default="127.0.0.1:50051", description="gRPC listen address.")
    metrics_listen: str | None = Field(
        default="127.0.0.1:9464", description="Prometheus /metrics address; null disables it."
    )
    tokens_file: Path = Field(description="YAML file of hashed bearer tokens.")
    report_interval_s: float = Field(default=5.0, gt=0, le=3600)
    stale_after_intervals: float = Field(default=3, gt=0)
    gone_after_intervals: float = Field(default=12, gt=0)
    max_message_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    tls: ServerTls | None = None

    _check_listen = field_validator("listen")(check_listen)

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics(cls, value: str | None) -> str | None:
        return None if value is None else check_listen(value)

    @model_validator(mode="after")
    def _order(self) -> SchedulerConfig:
        if self.gone_after_intervals <= self.stale_after_intervals:
            raise ValueError("gone_after_intervals must be greater than stale_after_intervals")
        return self


def load_scheduler_config(path: Path | str) -> SchedulerConfig:
    """Load and validate a scheduler config; relative paths are relative to the file."""
    path = Path(path)
    config = load_model(path, SchedulerConfig, env_prefix=ENV_PREFIX)
    base = path.resolve().parent
    config.tokens_file = resolve_path(base, config.tokens_file) or config.tokens_file
    if config.tls is not None:
        tls = config.tls
        tls.cert_file = resolve_path(base, tls.cert_file) or tls.cert_file
        tls.key_file = resolve_path(base, tls.key_file) or tls.key_file
        tls.client_ca_file = resolve_path(base, tls.client_ca_file)
    return config
