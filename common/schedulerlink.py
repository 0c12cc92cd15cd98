"""How a client reaches the scheduler: its config section, the gRPC channel and the token.

Agents, gateways and the operator's ``spillway status`` all dial out to the scheduler the same
way: ``scheduler: {address, token_file, tls}`` in their config files (:class:`SchedulerEndpoint`,
with :class:`ClientTls` for TLS or mutual TLS), a bearer token read from a file and sent as
per-call metadata (which also works on a plaintext channel, where gRPC refuses call
credentials), keepalives that notice a dead scheduler within about 15 s, and a jittered
exponential backoff between attempts (:class:`Reconnect`).

Several schedulers run active-active: the section then says ``addresses: [a:50051, b:50051]``
instead of ``address`` (one token file and one ``tls`` section serve them all), and
:attr:`SchedulerEndpoint.address_list` gives the list either way. :func:`load_client_config`
reads an agent's or a gateway's file so that an environment override of one of the two keys
takes the place of the other one written in the file.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.configfile import (
    ConfigError,
    apply_env_overrides,
    describe_error,
    read_secret,
    read_secret_line,
    read_yaml_mapping,
    resolve_path,
)

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")

# Detect a dead scheduler (or a half-open TCP connection) within ~15 s even when idle.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_host_port(value: str) -> str:
    """Accept ``host:port`` (``[v6]:port`` for IPv6) with a port in 1..65535."""
    match = _HOST_PORT.match(value)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError("expected host:port, e.g. scheduler.internal:50051")
    return value


class ClientTls(_Strict):
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


class SchedulerEndpoint(_Strict):
    """Where the scheduler is: ``address`` for one, ``addresses`` for several (exactly one of
    the two). The token file and the TLS settings serve every listed scheduler."""

    address: str | None = Field(
        default=None, description="host:port of the scheduler's gRPC endpoint."
    )
    addresses: list[str] | None = Field(
        default=None,
        description="host:port of every scheduler, when several run active-active; in an "
        "environment variable, separated by commas.",
    )
    token_file: Path = Field(
        description="File holding this client's bearer token (an agent's, or a gateway's)."
    )
    tls: ClientTls | None = None

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        return None if value is None else check_host_port(value)

    @field_validator("addresses", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """An environment override is one string: ``a:50051,b:50051``."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("expected at least one host:port, e.g. [a.internal:50051]")
        seen: set[str] = set()
        for item in value:
            try:
                check_host_port(item)
            except ValueError:
                raise ValueError(
                    f"{item!r}: expected host:port, e.g. scheduler.internal:50051"
                ) from None
            if item in seen:
                raise ValueError(f"{item} is listed twice; list each scheduler once")
            seen.add(item)
        return value

    @model_validator(mode="after")
    def _one_of(self) -> SchedulerEndpoint:
        if self.address is not None and self.addresses is not None:
            raise ValueError("give address (one scheduler) or addresses (several), not both")
        if self.address is None and self.addresses is None:
            raise ValueError(
                "address (one scheduler) or addresses (several schedulers) is required"
            )
        return self

    @property
    def address_list(self) -> tuple[str, ...]:
        """Every scheduler to reach, in the order written (one, for ``address``)."""
        if self.addresses is not None:
            return tuple(self.addresses)
        assert self.address is not None
        return (self.address,)

    def resolve_paths(self, base: Path) -> None:
        """Make the token and TLS file paths absolute, relative to ``base``."""
        self.token_file = resolve_path(base, self.token_file) or self.token_file
        if self.tls is not None:
            tls = self.tls
            tls.ca_file = resolve_path(base, tls.ca_file) or tls.ca_file
            tls.cert_file = resolve_path(base, tls.cert_file)
            tls.key_file = resolve_path(base, tls.key_file)


ModelT = TypeVar("ModelT", bound=BaseModel)
_PAIR = ("address", "addresses")


def load_client_config(
    path: Path, model: type[ModelT], *, env_prefix: str, environ: Mapping[str, str] | None = None
) -> ModelT:
    """:func:`common.configfile.load_model` for a file with a ``scheduler`` section, where an
    environment override of ``scheduler.address`` or ``scheduler.addresses`` replaces
    whichever of the two the file gives (an override would otherwise read as "both given")."""
    root, data = read_yaml_mapping(path)
    written = data.get("scheduler")
    in_file = set(written) & set(_PAIR) if isinstance(written, dict) else set()
    overrides = apply_env_overrides(data, env_prefix, os.environ if environ is None else environ)
    section = data.get("scheduler")
    overridden = {key for key in _PAIR if ("scheduler", key) in overrides}
    if isinstance(section, dict) and len(overridden) == 1:
        for key in in_file - overridden:
            section.pop(key, None)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [describe_error(path, root, err, overrides) for err in exc.errors()]
        raise ConfigError(path, problems) from exc


class Reconnect(_Strict):
    """Jittered exponential backoff between attempts to reach the scheduler."""

    initial_backoff_s: float = Field(default=0.5, gt=0, le=60)
    max_backoff_s: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _order(self) -> Reconnect:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")
        return self


@dataclass
class Backoff:
    """Full-jitter exponential backoff: attempt n sleeps uniform(0, min(cap, initial * 2**n))."""

    initial_s: float
    max_s: float
    rng: random.Random

    def delay(self, attempt: int, cap_s: float | None = None) -> float:
        cap = self.max_s if cap_s is None else min(self.max_s, cap_s)
        return self.rng.uniform(0.0, min(cap, self.initial_s * (2.0 ** min(attempt, 30))))


def read_token(path: Path) -> str:
    return read_secret_line(path, "bearer token")


#: The header naming the calling process (a random id drawn at start): the scheduler tells two
#: processes with one agent id apart by it.
INSTANCE_HEADER = "spillway-instance"


def auth_metadata(token: str, instance: str | None = None) -> tuple[tuple[str, str], ...]:
    """The bearer token, and with ``instance`` this process's id, as call metadata."""
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),)
    if instance is not None:
        metadata += ((INSTANCE_HEADER, instance),)
    return metadata


def open_channel(address: str, tls: ClientTls | None) -> grpc.aio.Channel:
    """A new channel to ``address``; TLS when ``tls`` is given, mutual TLS when it has a cert."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    root = read_secret(tls.ca_file, "CA certificate")
    key = read_secret(tls.key_file, "client key") if tls.key_file else None
    cert = read_secret(tls.cert_file, "client certificate") if tls.cert_file else None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )
    options = list(CHANNEL_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)
