"""How a client reaches the scheduler: its config section, the gRPC channel and the token.

Agents, gateways and the operator's ``spillway status`` all dial out to the scheduler the same
way: ``scheduler: {address, token_file, tls}`` in their config files (:class:`SchedulerEndpoint`,
with :class:`ClientTls` for TLS or mutual TLS), a bearer token read from a file and sent as
per-call metadata (which also works on a plaintext channel, where gRPC refuses call
credentials), keepalives that notice a dead scheduler within about 15 s, and a jittered
exponential backoff between attempts (:class:`Reconnect`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.configfile import read_secret, read_secret_line

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
    address: str = Field(description="host:port of the scheduler's gRPC endpoint.")
    token_file: Path = Field(
        description="File holding this client's bearer token (an agent's, or a gateway's)."
    )
    tls: ClientTls | None = None

    _check_address = field_validator("address")(check_host_port)


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
