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
slow password hash to protect.

The file must hold tokens when the scheduler starts: an empty file (no ``tokens`` key at all)
is a :class:`~common.configfile.ConfigError` then, never "nobody may call". Later the file is
re-read when it changes (:meth:`TokenStore.reload`, which :meth:`TokenStore.watch` runs off the
event loop); an edit that cannot be used (not UTF-8, binary, truncated to nothing, unreadable,
invalid, or anything else that fails) is logged once per distinct content and the previous
tokens stay in force. ``tokens: []``, written on purpose, does revoke every token. Nothing in
this module logs a token.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.configfile import (
    MAX_FILE_BYTES,
    ConfigError,
    describe_error,
    load_model,
    read_yaml_mapping,
)

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


@dataclass(frozen=True, slots=True)
class Credential:
    """Who called, and the hash of the token they called with (to notice its revocation)."""

    principal: Principal
    token_hash: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_tokens(path: Path) -> dict[str, Principal]:
    """The principals of a tokens file by token hash; :class:`ConfigError` when it is unusable,
    also when it is empty (no ``tokens`` key)."""
    root, data = read_yaml_mapping(path)
    if not data:
        raise ConfigError(
            path,
            [
                f"{path}: no tokens: the file is empty (spillway token new --tokens-file "
                f"{path} writes the first)"
            ],
        )
    try:
        parsed = _TokensFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, [describe_error(path, root, err) for err in exc.errors()]) from exc
    if "tokens" not in data:
        raise ConfigError(path, [f"{path}:1: tokens: required field is missing"])
    by_hash: dict[str, Principal] = {}
    for position, entry in enumerate(parsed.tokens):
        if entry.sha256 in by_hash:
            raise ConfigError(path, [f"{path}: tokens.{position}.sha256: same token listed twice"])
        by_hash[entry.sha256] = Principal(entry.id, entry.role)
    return by_hash


class TokenStore:
    """The hashed tokens of a tokens file, reloaded when the file changes.

    Thread-safe: :meth:`reload` may run in a worker thread while the event loop authenticates.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._digest = ""  # of the content in force
        self._refused_digest: str | None = None  # of the newest refused content, logged once
        #: Problems of the newest refused edit; empty while the newest content is in force.
        self.errors: list[str] = []
        self.refused_total = 0
        stamp = self._file_stamp()
        digest = self._content_digest()  # raises nothing; a read error shows in parse_tokens
        self._by_hash = parse_tokens(path)  # the first load must succeed: ConfigError
        self._stamp, self._digest = stamp, digest or ""

    @property
    def path(self) -> Path:
        return self._path

    def __len__(self) -> int:
        return len(self._by_hash)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _content_digest(self) -> str | None:
        try:
            with self._path.open("rb") as handle:
                return hashlib.sha256(handle.read(MAX_FILE_BYTES + 1)).hexdigest()
        except OSError:
            return None

    def reload(self) -> bool:
        """Read the file again if it changed; True when new tokens took force.

        Never raises: an unusable edit keeps the tokens in force, sets :attr:`errors` and is
        logged once per distinct content (the same broken bytes saved again are not news).
        """
        with self._lock:
            return self._reload_locked()

    def _reload_locked(self) -> bool:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        digest = self._content_digest()
        key = digest if digest is not None else f"unreadable {stamp}"
        if digest is not None and digest == self._digest:
            # Touched, or put back as it was: a later identical breakage is news again.
            self._stamp, self.errors, self._refused_digest = stamp, [], None
            return False
        if key == self._refused_digest:
            self._stamp = stamp
            return False
        try:
            by_hash = parse_tokens(self._path)
        except ConfigError as exc:
            problems = exc.problems
        except Exception as exc:  # whatever it was, the tokens in force stay
            problems = [f"{self._path}: cannot load: {type(exc).__name__}"]
        else:
            self._by_hash, self._stamp, self._digest = by_hash, stamp, digest or ""
            self._refused_digest, self.errors = None, []
            log.info("reloaded %d tokens from %s", len(by_hash), self._path)
            return True
        self._stamp, self._refused_digest, self.errors = stamp, key, problems
        self.refused_total += 1
        log.error("keeping the previous tokens: %s", "; ".join(problems))
        return False

    def _maybe_reload(self) -> None:
        # Never wait for a reload running in another thread: the tokens in force will do.
        if self._lock.acquire(blocking=False):
            try:
                self._reload_locked()
            finally:
                self._lock.release()

    async def watch(self, every_s: float, after: Callable[[], None] | None = None) -> None:
        """Reload every ``every_s`` seconds in a worker thread, then call ``after`` on the
        loop (whether or not anything changed), until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(self.reload)
                if after is not None:
                    after()
            except Exception:  # a callback failed: keep watching
                log.exception("tokens reload of %s failed", self._path)

    def principal_of(self, token_hash: str) -> Principal | None:
        """Whom the token with this hash belongs to now; None when it is no longer listed."""
        return self._by_hash.get(token_hash)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Credential | None:
        """The credential of the call's ``authorization: Bearer`` header, or None."""
        self._maybe_reload()
        for key, value in metadata or ():
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            token_hash = hash_token(token.strip())
            principal = self._by_hash.get(token_hash)
            return None if principal is None else Credential(principal, token_hash)
        return None

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal | None:
        """The principal for the call's ``authorization: Bearer`` header, or None."""
        credential = self.identify(metadata)
        return None if credential is None else credential.principal


def add_token(path: Path, principal_id: str, role: Role) -> str:
    """Create a token for ``principal_id``, store its hash in ``path``, and return the token.

    The read, change and replace happen under an exclusive lock on ``PATH.lock``: two
    schedulers sharing one tokens file (active-active, each issuing tokens for the machines it
    launches) never lose each other's entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries: list[dict[str, str]] = []
        if path.exists():
            entries = [e.model_dump() for e in load_model(path, _TokensFile).tokens]
        entries = [e for e in entries if not (e["id"] == principal_id and e["role"] == role)]
        token = new_token()
        entries.append({"id": principal_id, "role": role, "sha256": hash_token(token)})
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yaml.safe_dump({"tokens": entries}, handle, sort_keys=False)
        os.replace(tmp, path)
    finally:
        os.close(lock)  # releases the lock
    return token
