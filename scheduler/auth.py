"""Bearer-token authentication for the scheduler's gRPC API.

Tokens are random strings handed to agents, operators and gateways once; the scheduler keeps
only their SHA-256 in a YAML tokens file::

    tokens:
      - id: gpu-node-1        # the agent id this token is bound to
        role: agent
        sha256: 3f0a...
      - id: oncall
        role: operator        # may read the fleet; cannot report
        sha256: 91bc...
      - id: gw-1
        role: gateway         # may watch the routable fleet and report traffic; nothing else
        sha256: 5d2e...

Each role may call only its own service: ``agent`` the AgentService (as its own id),
``operator`` the FleetService, ``gateway`` the GatewayService (as its own gateway id).

A plain SHA-256 is the right hash here: tokens carry 256 random bits, so there is nothing for a
slow password hash to protect. The file is re-read when it changes; a broken edit is logged and
the previous tokens stay in force. Nothing in this module logs a token.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from common.configfile import ConfigError, load_model

log = logging.getLogger(__name__)

Role = Literal["agent", "operator", "gateway"]
TOKEN_PREFIX = "spw_"


class _TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=63)
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the token")


class _TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[_TokenEntry] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    role: Role


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenStore:
    """The hashed tokens of a tokens file, reloaded when the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._by_hash: dict[str, Principal] = {}
        self._load()  # the first load must succeed: raise ConfigError to the caller

    @property
    def path(self) -> Path:
        return self._path

    def _load(self) -> None:
        stamp = self._file_stamp()
        parsed = load_model(self._path, _TokensFile)
        by_hash: dict[str, Principal] = {}
        for position, entry in enumerate(parsed.tokens):
            if entry.sha256 in by_hash:
                raise ConfigError(
                    self._path, [f"{self._path}: tokens.{position}.sha256: same token listed twice"]
                )
            by_hash[entry.sha256] = Principal(entry.id, entry.role)
        self._by_hash = by_hash
        self._stamp = stamp

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _maybe_reload(self) -> None:
        if self._file_stamp() == self._stamp:
            return
        try:
            self._load()
            log.info("reloaded %d tokens from %s", len(self._by_hash), self._path)
        except ConfigError as exc:
            self._stamp = self._file_stamp()  # do not retry the same broken file every call
            log.error("keeping the previous tokens: %s", exc)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal | None:
        """The principal for the call's ``authorization: Bearer`` header, or None."""
        self._maybe_reload()
        for key, value in metadata or ():
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            return self._by_hash.get(hash_token(token.strip()))
        return None


def add_token(path: Path, principal_id: str, role: Role) -> str:
    """Create a token for ``principal_id``, store its hash in ``path``, and return the token."""
    entries: list[dict[str, str]] = []
    if path.exists():
        entries = [e.model_dump() for e in load_model(path, _TokensFile).tokens]
    entries = [e for e in entries if not (e["id"] == principal_id and e["role"] == role)]
    token = new_token()
    entries.append({"id": principal_id, "role": role, "sha256": hash_token(token)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yaml.safe_dump({"tokens": entries}, handle, sort_keys=False)
    os.replace(tmp, path)
    return token
