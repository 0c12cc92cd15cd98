"""The policy file: what runs where, what may spill to which clouds, and at what cost.

An operator writes one YAML file (``examples/policy.yaml`` documents every field). This module
holds its pydantic models (``extra="forbid"``: a misspelt field is an error, never ignored) and the
residency lock they resolve to.

:mod:`decisions.policycheck` checks a file against the schema and across fields.

Secrets never belong here: credentials are referenced by environment variable name, file path or
profile name, and anything that looks like a key or password is refused. No I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.configfile import Flag, Real, Whole
from decisions.endpoints import GatewayRouting, ManagedEndpoint
from providers.catalog import CLOUDS, Catalog

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
_NAME = re.compile(NAME_PATTERN)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WEIGHTS = re.compile(r"^(s3|gs|az|https?|file)://\S+$|^/\S*$")

Signal = Literal[
    "queued_per_replica",
    "running_per_replica",
    "kv_cache_usage",
    "queued_at_gateway",
    "overflow_tokens_per_s",
]
ProviderName = Literal["aws", "gcp", "azure"]

#: Values that are secrets, whatever field they sit in.
_SECRET_VALUES = (
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\"private_key\"\s*:"), "a service-account key"),
    (re.compile(r"\b(ghp|gho|github_pat|xox[abp]|sk)[-_][A-Za-z0-9_-]{16,}"), "an API token"),
    (re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|sig)=[A-Za-z0-9%+/=]{16,}"), "a key"),
)
#: Field names under ``credentials`` that would hold a secret itself.
_SECRET_KEYS = re.compile(
    r"(?i)(secret|password|passwd|token|private_key|access_key|account_key|api_key|^key$)"
)


class Strict(BaseModel):
    """Every policy model: unknown fields are errors, numbers are finite, and a value must be of
    its field's own type (``true`` is not 1, ``1e32`` is not a whole number of replicas)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def looks_like_secret(value: str) -> str | None:
    """What kind of secret ``value`` looks like, or None."""
    for pattern, what in _SECRET_VALUES:
        if pattern.search(value):
            return what
    return None


class CredentialRef(Strict):
    """Where a provider's credentials are found. Never the secret itself."""

    profile: str | None = Field(
        default=None, description="Named profile (AWS shared config, Azure CLI profile)."
    )
    file: Path | None = Field(
        default=None, description="Path to a credentials file (GCP service-account JSON, ...)."
    )
    env: list[str] = Field(
        default_factory=list,
        description="Names of environment variables that hold the credentials.",
    )
    project: str | None = Field(default=None, description="GCP project id (not a secret).")
    subscription_id: str | None = Field(
        default=None, description="Azure subscription id (not a secret)."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            inline = sorted(str(k) for k in data if _SECRET_KEYS.search(str(k)))
            if inline:
                raise ValueError(
                    f"{', '.join(inline)}: secrets may not be written in the policy file; "
                    "reference them instead with env: [VARIABLE_NAME], file: PATH or "
                    "profile: NAME"
                )
        return data

    @field_validator("env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _ENV_NAME.match(name):
                raise ValueError(
                    "expected names of environment variables (letters, digits, '_'), not "
                    "their values; a secret must never be written in the policy file"
                )
        return names

    @model_validator(mode="after")
    def _something(self) -> CredentialRef:
        if self.profile is None and self.file is None and not self.env:
            raise ValueError("say where the credentials are: profile, file or env")
        return self


class Credentials(Strict):
    aws: CredentialRef | None = None
    gcp: CredentialRef | None = None
    azure: CredentialRef | None = None

    def configured(self) -> list[str]:
        return [c for c in CLOUDS if getattr(self, c) is not None]


class ResidencyGroup(Strict):
    """A named set of regions per cloud. Reserved agents belong when their label says so."""

    aws: list[str] = Field(default_factory=list)
    gcp: list[str] = Field(default_factory=list)
    azure: list[str] = Field(default_factory=list)
    agent_labels: list[str] | None = Field(
        default=None,
        description="residency_group labels of reserved agents inside this group "
        "(default: the group's own name).",
    )

    def regions(self) -> dict[str, list[str]]:
        return {"aws": self.aws, "gcp": self.gcp, "azure": self.azure}


class Slo(Strict):
    """The latency the deployment promises; the gateway's queue is judged against it."""

    ttft_s: Real = Field(
        default=2.0, gt=0, le=3600, description="Time to first token to hold, seconds."
    )
    saturated_queue_age: Real = Field(
        default=0.25,
        gt=0,
        le=1.0,
        description="A share of ttft_s: when the oldest request waiting at a gateway is older "
        "than saturated_queue_age x ttft_s, the deployment is saturated now and scales up on "
        "this tick, without waiting for the scale-up window.",
    )

    @property
    def saturated_after_s(self) -> float:
        return self.saturated_queue_age * self.ttft_s


class SpillCosts(Strict):
    """What renting a replica costs against sending its traffic to a managed endpoint
    (see :mod:`decisions.costs` for the formulas)."""

    replica_tokens_per_s: Real = Field(
        default=5000.0,
        gt=0,
        le=1e9,
        description="Tokens per second (input and output together, as the gateways count "
        "overflow) one replica carries within the SLO; while the gateways overflow, what the "
        "healthy replicas report generating (over 1 - input_token_share) is used instead.",
    )
    cold_start_s: Real = Field(
        default=450.0,
        ge=0,
        le=86_400,
        description="From the decision to rent until the replica serves: launch, boot, "
        "weights, start. Paid for, and served by the managed endpoint meanwhile.",
    )
    billing_minimum_s: Real = Field(
        default=60.0, ge=0, le=86_400, description="A rented machine is billed at least this long."
    )
    expected_episode_s: Real = Field(
        default=600.0,
        gt=0,
        le=7 * 86_400,
        description="How long an overflow episode is expected to last before any was seen "
        "(the prior; afterwards the episodes' own durations decide).",
    )
    episode_gap_s: Real = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description="An episode ends after this long without overflow, queue or a rented "
        "replica that is needed.",
    )
    input_token_share: Real = Field(
        default=0.75,
        ge=0,
        le=1,
        description="Share of overflow tokens that are input tokens: blends the endpoint's "
        "input and output prices into one price per token.",
    )
    release_ratio: Real = Field(
        default=1.5,
        ge=1,
        le=100,
        description="Release a rented replica only when keeping it costs more than this many "
        "times the alternative (managed endpoint, free reserved room) ...",
    )
    release_after_s: Real = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="... and that has held this long without a break.",
    )


class Autoscaling(Strict):
    signal: Signal = Field(
        default="queued_per_replica",
        description="What drives scaling: queued or running requests per healthy replica, "
        "KV-cache use (0..1), requests waiting in the gateways' queues (all gateways together), "
        "or tokens per second the gateways send to managed endpoints.",
    )
    target: Real = Field(gt=0, le=1e12, description="Scale up when the signal stays above this.")
    scale_down_below: Real | None = Field(
        default=None,
        ge=0,
        le=1e12,
        description="Scale down only when the signal stays below this (default: half the "
        "target). The gap between the two is the hysteresis band.",
    )
    max_step_up: Whole = Field(
        default=2, ge=1, le=1000, description="Replicas added per decision, at most."
    )
    max_step_down: Whole = Field(
        default=1, ge=1, le=1000, description="Replicas removed per decision, at most."
    )
    costs: SpillCosts = Field(
        default_factory=SpillCosts,
        description="The cost model of renting against managed endpoints and free reserved "
        "room: rentals that only replace managed overflow, and every release of a rented "
        "replica, are decided by it.",
    )

    @property
    def low_water(self) -> float:
        return self.target / 2 if self.scale_down_below is None else self.scale_down_below

    @model_validator(mode="after")
    def _band(self) -> Autoscaling:
        if self.scale_down_below is not None and self.scale_down_below >= self.target:
            raise ValueError(
                f"scale_down_below ({self.scale_down_below:g}) must be below target "
                f"({self.target:g}), or replicas would flap"
            )
        if self.signal == "kv_cache_usage" and self.target > 1:
            raise ValueError(f"kv_cache_usage is a share from 0 to 1; target {self.target:g}")
        return self


class WarmPool(Strict):
    """Stopped machines kept for a deployment: bounded in number and in age."""

    max_machines: Whole = Field(
        default=1,
        ge=1,
        le=1000,
        description="Stopped machines kept per deployment, at most; a release beyond this "
        "terminates its machine, and the sweeper terminates the oldest beyond it.",
    )
    max_stopped_s: Real = Field(
        default=3600,
        gt=0,
        le=30 * 86_400,
        description="A machine stopped this long is terminated by the sweeper.",
    )


class Spillover(Strict):
    enabled: Flag = Field(default=False, description="May this deployment rent cloud GPUs?")
    providers: list[ProviderName] = Field(
        default_factory=list,
        description="Clouds it may rent from (default: every cloud under credentials).",
    )
    residency: str | None = Field(
        default=None,
        description="Residency group the replicas are locked to (a group of this file or of "
        "the catalog: eu, us, uk, ...). Unset: no lock.",
    )
    max_spilled_replicas: Whole = Field(default=0, ge=0, le=10_000)
    max_usd_per_hour: Real | None = Field(
        default=None,
        gt=0,
        le=1e7,
        description="Cap on the hourly list price of all rented machines (USD).",
    )
    scale_up_window_s: Real = Field(
        default=60,
        gt=0,
        le=86_400,
        description="The signal must stay over target this long to scale up.",
    )
    cool_down_s: Real = Field(
        default=600,
        gt=0,
        le=7 * 86_400,
        description="The signal must stay low this long to scale down.",
    )
    release: Literal["terminate", "stop"] = Field(
        default="terminate",
        description="What happens to a rented machine once its replica is drained: terminate "
        "it, or stop it with its disk (and the weights on it) kept, into the warm pool. A cloud "
        "or machine that cannot be stopped (one-time spot) is terminated all the same.",
    )
    warm_pool: WarmPool | None = Field(
        default=None,
        description="Bounds of the warm pool (only with release: stop; default: one machine "
        "for an hour).",
    )

    @model_validator(mode="after")
    def _warm_pool(self) -> Spillover:
        if self.release == "terminate" and self.warm_pool is not None:
            raise ValueError(
                "warm_pool is set but release is terminate: no machine is ever stopped; set "
                "release: stop or remove warm_pool"
            )
        return self

    def warm(self) -> WarmPool | None:
        """The warm pool's bounds, or None when released machines are terminated."""
        if self.release != "stop":
            return None
        return self.warm_pool if self.warm_pool is not None else WarmPool()


class Deployment(Strict):
    model: str = Field(min_length=1, description="Served model name.")
    weights: str = Field(description="s3://, gs://, az://, https:// URI or absolute path.")
    runtime: Literal["sglang", "simulated"] = "sglang"
    runtime_args: list[str] = Field(default_factory=list)
    sku: str = Field(description="Fungible GPU SKU from the catalog, e.g. H100-80GB.")
    gpus: Whole = Field(ge=1, le=64, description="GPUs per replica, all on one machine.")
    pools: list[str] = Field(default_factory=list, description="Reserved pools that serve it.")
    min_replicas: Whole = Field(default=1, ge=0, le=10_000)
    max_replicas: Whole = Field(ge=1, le=10_000)
    autoscaling: Autoscaling
    slo: Slo = Field(default_factory=Slo, description="The latency target the gateway holds.")
    spillover: Spillover = Field(default_factory=Spillover)
    managed: list[ManagedEndpoint] = Field(
        default_factory=list,
        description="Hosted APIs serving the same model: overflow once replicas are full.",
    )
    gateway: GatewayRouting = Field(default_factory=GatewayRouting)

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if not _WEIGHTS.match(value):
            raise ValueError("expected s3://, gs://, az://, http(s)://, file:// or /absolute/path")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> Deployment:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


class Policy(Strict):
    residency_groups: dict[str, ResidencyGroup] = Field(default_factory=dict)
    credentials: Credentials = Field(default_factory=Credentials)
    deployments: dict[str, Deployment]

    @field_validator("deployments", "residency_groups")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(
                    f"name {name!r}: lower case letters, digits, '.', '_', '-' (at most 63)"
                )
        return value


# -- the lock, resolved -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lock:
    """Where a deployment's replicas may run. ``regions`` None means no lock."""

    name: str | None
    #: (cloud, region) pairs replicas may be rented in; None: anywhere.
    regions: frozenset[tuple[str, str]] | None
    #: residency_group labels of reserved agents inside the lock; None: any agent.
    agent_labels: frozenset[str] | None

    def allows_region(self, cloud: str, region: str) -> bool:
        return self.regions is None or (cloud, region) in self.regions

    def allows_agent(self, residency_label: str) -> bool:
        return self.agent_labels is None or residency_label in self.agent_labels

    def allows_group(self, residency_group: str) -> bool:
        """A managed endpoint in ``residency_group``: the lock's own group or one of its labels."""
        return (
            self.name is None or residency_group == self.name or self.allows_agent(residency_group)
        )


UNLOCKED = Lock(None, None, None)


def resolve_lock(policy: Policy, deployment: Deployment, catalog: Catalog) -> Lock:
    """The lock of ``deployment``: its spillover residency group as regions per cloud."""
    name = deployment.spillover.residency
    if name is None:
        return UNLOCKED
    return group_lock(name, policy.residency_groups.get(name), catalog)


def group_lock(name: str, group: ResidencyGroup | None, catalog: Catalog) -> Lock:
    if group is not None:
        pairs = frozenset((c, r) for c, regions in group.regions().items() for r in regions)
        labels = frozenset(group.agent_labels if group.agent_labels is not None else [name])
        return Lock(name, pairs, labels)
    pairs = frozenset(
        (c.cloud, r.name)
        for c in catalog.clouds.values()
        for r in c.regions.values()
        if r.residency == name
    )
    return Lock(name, pairs, frozenset({name}))


def spill_providers(policy: Policy, deployment: Deployment) -> list[str]:
    """Clouds ``deployment`` may rent from: its list, or every cloud with credentials."""
    return list(deployment.spillover.providers) or policy.credentials.configured()
