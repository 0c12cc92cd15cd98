"""Client side of the connection to the scheduler: the gRPC channel, TLS, and the bearer token.

Shared by the agent's reporter and the operator's ``spillway status``.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from agent.config import ClientTls
from common.configfile import CredentialError, read_secret

# Detect a dead scheduler (or a half-open TCP connection) within ~15 s even when idle.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def read_token(path: Path) -> str:
    token = read_secret(path, "bearer token").decode("utf-8", errors="strict").strip()
    if any(ch.isspace() for ch in token):
        raise CredentialError(f"{path}: bearer token must be a single line without spaces")
    return token


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


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
