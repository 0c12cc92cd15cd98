"""What every handler of the scheduler's gRPC services does before its own work: decode the
request itself, authenticate the caller, and refuse a call with a status, counted and logged.

Requests are decoded here, not by gRPC (:func:`lenient_decoder`), so that a message that is not
valid protobuf, or is larger than ``max_message_bytes``, is answered with INVALID_ARGUMENT
(gRPC alone would answer INTERNAL) and every other agent's stream carries on. A message larger
than the transport's own limit (four times ``max_message_bytes``, see
:data:`TRANSPORT_LIMIT_FACTOR`) is refused by gRPC before any of this code sees it, with
RESOURCE_EXHAUSTED: gRPC reads the length in the message's prefix and refuses without reading
the body, while letting it through would mean buffering it whole (a 300 MB message cost a
server without the limit 900 MB of memory).

Every refusal is counted (the ``spillway_rejected_calls`` metric counts each one), but logged
through :class:`RefusalLog`: at most one line per (peer address, status code) per
:data:`REFUSAL_LOG_WINDOW_S`, with the number of refusals the window suppressed, so that a
misbehaving client cannot fill the log.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from scheduler.auth import Credential, TokenStore

log = logging.getLogger("scheduler.server")

MessageT = TypeVar("MessageT", bound=Message)
#: gRPC's own receive limit is this many times ``max_message_bytes``: messages between the two
#: limits are answered INVALID_ARGUMENT by :func:`lenient_decoder`, larger ones
#: RESOURCE_EXHAUSTED by gRPC.
TRANSPORT_LIMIT_FACTOR = 4
REFUSAL_LOG_WINDOW_S = 10.0
#: Distinct (peer, code) pairs tracked at once; refusals beyond are logged under one key.
MAX_REFUSAL_KEYS = 1024
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Malformed:
    """Stands in for a request that could not be decoded; the handler answers INVALID_ARGUMENT."""

    reason: str


def lenient_decoder(cls: type[MessageT], max_bytes: int) -> Callable[[bytes], MessageT | Malformed]:
    def decode(raw: bytes) -> MessageT | Malformed:
        if len(raw) > max_bytes:
            return Malformed(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            return Malformed(f"not a valid {cls.DESCRIPTOR.full_name}: {exc}")
        except Exception as exc:  # protobuf's C decoder raises little else, but never UNKNOWN
            return Malformed(f"not a valid {cls.DESCRIPTOR.full_name}: {type(exc).__name__}")

    return decode


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.5:41234`` -> ``ipv4:10.0.0.5``: a client's address without its port,
    which changes with every connection."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer


class RefusalLog:
    """At most one log line per (peer address, code) per ``window_s``; the refusals in between
    are counted and their number logged with the next line, or by :meth:`flush` once the window
    is over. Written by hand: the standard library's logging has no rate limit."""

    def __init__(
        self,
        logger: logging.Logger = log,
        window_s: float = REFUSAL_LOG_WINDOW_S,
        *,
        max_keys: int = MAX_REFUSAL_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.window_s = window_s
        self._max_keys = max_keys
        self._clock = clock
        #: (peer address, code) -> [window start, refusals suppressed since, newest detail]
        self._windows: dict[tuple[str, str], list[Any]] = {}
        self.lines = 0

    def refused(self, peer: str, code: str, detail: str) -> None:
        now = self._clock()
        key = (peer_host(peer), code)
        if key not in self._windows and len(self._windows) >= self._max_keys:
            key = ("(other peers)", code)
        window = self._windows.get(key)
        if window is not None and now - window[0] < self.window_s:
            window[1] += 1
            window[2] = detail
            return
        suppressed = window[1] if window is not None else 0
        self._windows[key] = [now, 0, detail]
        self.lines += 1
        if suppressed:
            self._log.warning(
                "refused a call from %s: %s: %s (and %d more like it in the previous %.0fs)",
                key[0],
                code,
                detail,
                suppressed,
                self.window_s,
            )
        else:
            self._log.warning("refused a call from %s: %s: %s", key[0], code, detail)

    def flush(self) -> None:
        """Log the counts of windows that are over, and forget those windows."""
        now = self._clock()
        for key, (start, suppressed, detail) in list(self._windows.items()):
            if now - start < self.window_s:
                continue
            del self._windows[key]
            if suppressed:
                self.lines += 1
                self._log.warning(
                    "refused %d more calls from %s with %s in %.0fs (the last: %s)",
                    suppressed,
                    key[0],
                    key[1],
                    self.window_s,
                    detail,
                )


class Guard:
    """Authentication and refusals, shared by every service of one scheduler."""

    def __init__(self, tokens: TokenStore, refusals: RefusalLog | None = None) -> None:
        self.tokens = tokens
        self.refusals = refusals or RefusalLog()
        self.rejected: Counter[str] = Counter()  # by status code name

    async def reject(self, context: Context, code: grpc.StatusCode, detail: str) -> NoReturn:
        self.rejected[code.name] += 1
        self.refusals.refused(context.peer(), code.name, detail)
        await context.abort(code, detail)
        raise AssertionError("unreachable: abort raises")

    async def credential(self, context: Context, role: str) -> Credential:
        """The caller's credential; refused unless its token is known and of ``role``."""
        try:
            credential = self.tokens.identify(context.invocation_metadata())
        except Exception:  # a header nobody can read is no token
            credential = None
        if credential is None:
            await self.reject(
                context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token"
            )
        principal = credential.principal
        if principal.role != role:
            await self.reject(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"a token of role {principal.role!r} cannot call this method",
            )
        return credential

    async def malformed(self, context: Context, request: object) -> None:
        """Refuse with INVALID_ARGUMENT when ``request`` could not be decoded."""
        if isinstance(request, Malformed):
            await self.reject(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
