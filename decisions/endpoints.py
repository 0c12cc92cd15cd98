"""The policy's traffic sections: managed endpoints and how the gateway routes a deployment.

A deployment may list **managed endpoints**: OpenAI-compatible APIs that already serve the same
model (a hosted API, or an always-on deployment of the customer's own). They take overflow the
moment the deployment's reserved and rented replicas are full, and only when they sit inside
the deployment's residency lock. Their keys are referenced by environment variable name, never
written here.

``gateway`` tunes the gateway for one deployment: per-replica concurrency (a static cap, and
the adaptive limit under it that ``admission`` tunes, see :mod:`decisions.admission`), the
bounded queue, affinity and its load bound, and how gently a new replica is filled.
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.configfile import Flag, Real, Whole

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BASE_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
_PATH_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number (got {value})")
    return value


class ManagedEndpoint(_Strict):
    name: str = Field(description="Names the endpoint in metrics, headers and reports.")
    base_url: str = Field(
        description="OpenAI-compatible base URL, e.g. https://api.example.com/v1; requests go "
        "to BASE_URL/chat/completions and BASE_URL/completions."
    )
    model: str | None = Field(
        default=None,
        description="The model's name at this endpoint, when it differs from the deployment's "
        "(the request's model field is then rewritten for this endpoint only).",
    )
    residency_group: str = Field(
        min_length=1,
        description="Where the endpoint processes data (a residency group: eu, us, ...); used "
        "only by deployments locked to that group, or not locked.",
    )
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the endpoint's API key."
    )
    usd_per_million_input_tokens: Real = Field(ge=0, le=1e6)
    usd_per_million_output_tokens: Real = Field(ge=0, le=1e6)
    max_concurrency: Whole = Field(ge=1, le=100_000, description="Requests in flight at most.")
    added_latency_s: Real = Field(
        default=0.0,
        ge=0,
        le=600,
        description="Expected extra time to first token against a replica of our own (for the "
        "simulator; the gateway measures the real one).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("lower case letters, digits, '.', '_', '-' (at most 63)")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not _BASE_URL.match(value):
            raise ValueError("expected http(s)://host[:port]/path with no query")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(
                "the name of an environment variable (letters, digits, '_'), not the key itself"
            )
        return value

    @field_validator("usd_per_million_input_tokens", "usd_per_million_output_tokens")
    @classmethod
    def _price(cls, value: float) -> float:
        return _finite(value)

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.usd_per_million_input_tokens
            + output_tokens * self.usd_per_million_output_tokens
        ) / 1e6


class Admission(_Strict):
    """How the gateway decides that a replica is full (see :mod:`decisions.admission`)."""

    adaptive: Flag = Field(
        default=True,
        description="A replica is full when one more request would break slo.ttft_s, as its "
        "observed time to first token says (AIMD, see decisions.admission); false: only at "
        "the static cap.",
    )
    target_share: Real = Field(
        default=0.75,
        gt=0,
        le=1.0,
        description="A first token later than target_share x slo.ttft_s after sending is slow "
        "and lowers the replica's limit (the rest of the target is left for the gateway's queue "
        "and the network).",
    )
    min_concurrency: Whole = Field(
        default=2, ge=1, le=100_000, description="The limit never falls below this."
    )
    initial_concurrency: Whole = Field(
        default=16,
        ge=1,
        le=100_000,
        description="A new replica's limit (within min_concurrency and the static cap).",
    )
    backoff: Real = Field(
        default=0.9,
        gt=0,
        lt=1.0,
        description="A slow sample sets the limit to backoff x the requests in flight.",
    )
    backoff_interval_s: Real = Field(
        default=1.0, ge=0, le=600, description="At most one cut per this many seconds."
    )
    probe_interval_s: Real = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="A replica at its limit that was sent nothing for this long takes one more.",
    )
    window_s: Real = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="Every this many seconds, a limit above twice the most requests in flight "
        "meanwhile falls to that twice.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Admission:
        if self.initial_concurrency < self.min_concurrency:
            raise ValueError(
                f"initial_concurrency ({self.initial_concurrency}) must be at least "
                f"min_concurrency ({self.min_concurrency})"
            )
        return self


class GatewayRouting(_Strict):
    path_prefix: str | None = Field(
        default=None,
        description="Requests under this path go to this deployment whatever their model field "
        "says, e.g. /chat-eu for /chat-eu/v1/chat/completions (default: /NAME).",
    )
    max_concurrency_per_replica: Whole | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Requests in flight per replica at most (default: the replica's own "
        "max_running_requests; the smaller of the two when both are known); with adaptive "
        "admission, the ceiling of the adaptive limit.",
    )
    admission: Admission = Field(default_factory=Admission)
    queue_size: Whole = Field(
        default=256, ge=0, le=100_000, description="Requests that may wait when nothing has room."
    )
    queue_timeout_s: Real = Field(
        default=30.0, gt=0, le=3600, description="A request waits this long at most, then 503."
    )
    affinity: Flag = Field(
        default=True,
        description="Keep a conversation on the replica that holds its KV cache: by the "
        "request's user field or x-session-id header, else by its prompt's beginning.",
    )
    affinity_prefix_chars: Whole = Field(
        default=1024,
        ge=16,
        le=1_000_000,
        description="How much of the prompt's beginning names a conversation without a session.",
    )
    max_load_factor: Real = Field(
        default=1.25,
        ge=1.0,
        le=16.0,
        description="Affinity never loads a replica past this factor over its tier's mean.",
    )
    warmup_s: Real = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="A replica that just became healthy is filled gradually over this long.",
    )

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and (not _PATH_PREFIX.match(value) or value.startswith("/v1")):
            raise ValueError("a path like /chat-eu (letters, digits, '.', '_', '~', '-'; not /v1)")
        return value

    @model_validator(mode="after")
    def _admission_under_cap(self) -> GatewayRouting:
        cap = self.max_concurrency_per_replica
        if cap is not None and self.admission.min_concurrency > cap:
            raise ValueError(
                f"admission.min_concurrency ({self.admission.min_concurrency}) must not exceed "
                f"max_concurrency_per_replica ({cap})"
            )
        return self
