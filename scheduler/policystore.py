"""The running scheduler's policy: loaded once at start, reloaded when the file changes.

An edit that does not pass ``spillway policy check`` never replaces the running policy: the old
one stays in force and the store keeps the rejected edit's errors (``FILE:LINE: field: ...``) so
that they can be logged, shown and exported as a metric. A valid edit replaces the policy and
calls ``on_change`` with the new policy and its digest, which is how deployment workflows learn
of it.

Reading the file is the only I/O here; what the policy means is decided elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.configfile import ConfigError
from decisions.policy import Policy
from decisions.policycheck import check_policy
from providers.catalog import Catalog, default_catalog

log = logging.getLogger(__name__)

OnChange = Callable[[Policy, str], None]


@dataclass(frozen=True, slots=True)
class _Reading:
    data: bytes
    policy: Policy | None
    errors: list[str]
    #: The bytes are those already seen: nothing to do.
    unchanged: bool = False


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class PolicyStore:
    """The policy in force, its digest, and the errors of the last rejected edit (if any)."""

    def __init__(
        self,
        path: Path | str,
        catalog: Catalog | None = None,
        on_change: OnChange | None = None,
    ) -> None:
        self.path = Path(path)
        self.catalog = catalog or default_catalog()
        self.on_change = on_change
        self._policy: Policy | None = None
        self.digest = ""
        #: Errors of the newest edit that was refused; empty once a valid edit is loaded.
        self.errors: list[str] = []
        self.loaded_at = 0.0
        self.rejected_total = 0
        self._seen = b""

    @property
    def policy(self) -> Policy:
        if self._policy is None:
            raise RuntimeError("the policy has not been loaded; call load() first")
        return self._policy

    def load(self) -> Policy:
        """Load the file; :class:`ConfigError` (every problem, with lines) when it is invalid."""
        data, result = self._check()
        if result is None:
            raise ConfigError(self.path, self.errors)
        self._install(result, data)
        return result

    def reload(self) -> bool:
        """Read the file again. True when a new valid policy replaced the old one.

        Unchanged content is a no-op; an invalid edit keeps the old policy and sets ``errors``.
        """
        return self._apply(self._read())

    def _read(self) -> _Reading:
        """Read and check the file; touches no state, so it may run off the event loop."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            return _Reading(b"", None, [f"{self.path}: cannot read: {exc.strerror or exc}"])
        if data == self._seen:
            return _Reading(data, None, [], unchanged=True)
        result = check_policy(self.path, self.catalog)
        return _Reading(data, result.policy, result.errors)

    def _apply(self, reading: _Reading) -> bool:
        if reading.unchanged:
            return False
        data, policy = reading.data, reading.policy
        if policy is None and not data:
            self._refuse(data=b"", errors=reading.errors)
            return False
        if policy is None:
            self._seen = data
            self.errors = reading.errors
            self.rejected_total += 1
            log.error(
                "policy %s refused; keeping the policy in force (%s):\n  %s",
                self.path,
                self.digest or "none",
                "\n  ".join(self.errors),
            )
            return False
        if _digest(data) == self.digest:
            self._seen = data
            self.errors = []
            return False
        self._install(policy, data)
        log.info("policy %s reloaded (%s)", self.path, self.digest)
        if self.on_change is not None:
            self.on_change(policy, self.digest)
        return True

    def _check(self, data: bytes | None = None) -> tuple[bytes, Policy | None]:
        if data is None:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                self.errors = [f"{self.path}: cannot read: {exc.strerror or exc}"]
                return b"", None
        result = check_policy(self.path, self.catalog)
        self.errors = result.errors
        return data, result.policy

    def _refuse(self, data: bytes, errors: list[str]) -> None:
        if data != self._seen or errors != self.errors:
            log.error("policy %s: %s; keeping the policy in force", self.path, "; ".join(errors))
            self.rejected_total += 1
        self._seen = data
        self.errors = errors

    def _install(self, policy: Policy, data: bytes) -> None:
        self._policy = policy
        self.digest = _digest(data)
        self._seen = data
        self.errors = []
        self.loaded_at = time.time()

    async def watch(self, every_s: float = 1.0) -> None:
        """Reload whenever the file's content changes, until cancelled.

        Reading and checking run in a worker thread, so a large or hostile file never stalls
        the gRPC server on this event loop; the new policy is installed (and ``on_change``
        called) back on the loop.
        """
        while True:
            await asyncio.sleep(every_s)
            try:
                self._apply(await asyncio.to_thread(self._read))
            except Exception:  # a callback failed: keep watching
                log.exception("policy reload of %s failed", self.path)
