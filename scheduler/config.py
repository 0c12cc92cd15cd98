"""The scheduler's config file: where it listens, how often agents report, who may talk to it.

Read from YAML with ``SPILLWAY_SCHEDULER_*`` environment overrides (``__`` separates nested keys).
Secrets are never written here: tokens live, hashed, in ``tokens_file``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from common.configfile import load_model, resolve_path
from common.temporallink import TemporalLink, resolve_paths

ENV_PREFIX = "SPILLWAY_SCHEDULER_"
_LISTEN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):(\d{1,5})$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_listen(value: str) -> str:
    match = _LISTEN.match(value)
    if match is None or int(match.group(2)) > 65535:
        raise ValueError("expected host:port (port 0 picks a free one), e.g. 0.0.0.0:50051")
    return value


_ANY_HOST = ("", "0.0.0.0", "[::]", "::")


def _same_socket(a: str, b: str) -> bool:
    """Whether two listen addresses would claim the same port (port 0 never does)."""
    host_a, _, port_a = a.rpartition(":")
    host_b, _, port_b = b.rpartition(":")
    if port_a != port_b or int(port_a) == 0:
        return False
    return host_a == host_b or host_a in _ANY_HOST or host_b in _ANY_HOST


class ServerTls(Strict):
    """TLS for the gRPC endpoint. With ``client_ca_file`` every client must present a
    certificate signed by that CA (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class TemporalSettings(TemporalLink):
    """The Temporal service whose workflows act on the fleet (the dev server locally): the
    shared connection settings (address, namespace, identity, TLS, API key) and the control
    plane's task queue."""

    task_queue: str = Field(
        default="spillway-control", min_length=1, description="The control plane's task queue."
    )


class SpillSettings(Strict):
    """How the workflows pace and bound their work."""

    decide_every_s: float | None = Field(
        default=None, gt=0, le=3600, description="Autoscaling tick; default: report_interval_s."
    )
    weights_dir: str = Field(
        default="/var/lib/spillway/weights",
        min_length=1,
        description="Where on a node prefetched weights go (one directory per deployment).",
    )
    weights_endpoint_url: str | None = Field(
        default=None, description="Another S3-compatible endpoint for s3:// weights."
    )
    launch_offers: int = Field(
        default=5, ge=1, le=50, description="Offers a provision walks before it gives up."
    )
    register_timeout_s: float = Field(default=900, gt=0, description="Launch to agent registered.")
    prefetch_timeout_s: float = Field(default=3600, gt=0)
    start_timeout_s: float = Field(default=1800, gt=0, description="Start to replica healthy.")
    drain_timeout_s: float = Field(default=600, gt=0)
    heartbeat_timeout_s: float = Field(
        default=30, gt=0, description="A worker silent this long is presumed dead; retried."
    )
    failure_backoff_s: float = Field(
        default=60, ge=0, description="After a failed provision, wait this long before the next."
    )
    sweep_every_s: float = Field(default=60, gt=0, description="How often leaks are looked for.")
    leak_grace_s: float = Field(
        default=900, ge=0, description="A managed machine nobody owns for this long is a leak."
    )


class AwsCloud(Strict):
    image: str = Field(min_length=1, description="AMI id the machines boot.")
    endpoint_url: str | None = Field(default=None, description="Another EC2 endpoint (tests).")
    regions: list[str] | None = Field(
        default=None, description="Regions searched for machines (default: the catalog's)."
    )
    subnets: dict[str, str] = Field(default_factory=dict, description="zone -> subnet id.")
    security_group_ids: list[str] = Field(default_factory=list)
    instance_profile_arn: str = ""


class GcpCloud(Strict):
    image: str = Field(min_length=1, description="Image or image family link.")
    api_endpoint: str | None = None
    network: str = "global/networks/default"
    subnetwork: str = ""
    service_account: str = ""


class AzureCloud(Strict):
    image: str = Field(min_length=1, description="Image id or publisher:offer:sku:version.")
    resource_group: str = Field(min_length=1)
    subnet_id: str = Field(min_length=1, description="Full resource id of the subnet.")
    admin_ssh_public_key: str = Field(min_length=1)
    base_url: str | None = None


class Clouds(Strict):
    """Per cloud: the image machines boot and where they go. Credentials are in the policy."""

    aws: AwsCloud | None = None
    gcp: GcpCloud | None = None
    azure: AzureCloud | None = None


class StandIn(Strict):
    """Demos and tests without real machines: every machine launched through a cloud API is
    stood in for by a local ``spillway agent run`` process with the machine's labels."""

    state_dir: Path
    agent_settings: dict[str, Any] = Field(
        default_factory=dict, description="Agent config keys merged into each stand-in's config."
    )


class SchedulerConfig(Strict):
    listen: str = Field(default="127.0.0.1:50051", description="gRPC listen address.")
    metrics_listen: str | None = Field(
        default="127.0.0.1:9464", description="Prometheus /metrics address; null disables it."
    )
    tokens_file: Path = Field(description="YAML file of hashed bearer tokens.")
    tokens_reload_every_s: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description="How often the tokens file is re-read; a revoked token's streams end then.",
    )
    report_interval_s: float = Field(default=5.0, gt=0, le=3600)
    stale_after_intervals: float = Field(default=3, gt=0)
    gone_after_intervals: float = Field(default=12, gt=0)
    max_message_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    tls: ServerTls | None = None
    policy_file: Path | None = Field(
        default=None, description="The policy; reloaded when it changes. None: observe only."
    )
    policy_reload_every_s: float = Field(default=2.0, gt=0, le=3600)
    temporal: TemporalSettings | None = Field(
        default=None, description="Where workflows run; needed with policy_file."
    )
    spill: SpillSettings = Field(default_factory=SpillSettings)
    clouds: Clouds = Field(default_factory=Clouds)
    stand_in: StandIn | None = None

    _check_listen = field_validator("listen")(check_listen)

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        check_listen(value)
        listen = info.data.get("listen")
        if isinstance(listen, str) and _same_socket(listen, value):
            raise ValueError(
                f"the same address as listen ({listen}): gRPC and /metrics need a port each"
            )
        return value

    @model_validator(mode="after")
    def _order(self) -> SchedulerConfig:
        if self.gone_after_intervals <= self.stale_after_intervals:
            raise ValueError("gone_after_intervals must be greater than stale_after_intervals")
        if self.policy_file is not None and self.temporal is None:
            raise ValueError("policy_file needs a temporal section: the workflows act on it")
        return self

    @property
    def decide_every_s(self) -> float:
        return self.spill.decide_every_s or self.report_interval_s


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
    config.policy_file = resolve_path(base, config.policy_file)
    if config.temporal is not None:
        resolve_paths(config.temporal, base)
    if config.stand_in is not None:
        config.stand_in.state_dir = (
            resolve_path(base, config.stand_in.state_dir) or config.stand_in.state_dir
        )
    return config
