"""The long-lived streams the scheduler has open, by who holds them, and the rules that bound
them: one Report stream per agent id, at most :data:`MAX_WATCHES_PER_GATEWAY` fleet watches per
gateway id, and no stream kept open by a silent agent or a revoked token.

**One process per agent id.** Every call an agent makes carries the ``spillway-instance``
header (``common.schedulerlink.INSTANCE_HEADER``), a random id its process draws when it
starts. An agent id is *held* by the process whose Report stream is open and was heard from
within the silence limit (the stale limit, at least two report intervals). While it is held:

- a Report stream or a Register from another instance is refused with ALREADY_EXISTS, naming
  the id; a call without the header counts as another instance;
- the same instance may register again and open a new stream: that is a reconnect after a
  network blip the scheduler has not noticed yet, and the new stream replaces the old one.

Once the holder has been silent past the limit, the next process takes the id over (logged at
WARNING with both instances); the sweeper closes silent Report streams anyway
(:meth:`StreamRegistry.silent`). Fleet watches are not silent by nature (the scheduler sends),
so they are bounded by count instead, and a dead gateway's watch ends with its connection.

A stream is closed from outside (replaced, silent, revoked) with :meth:`Stream.close`: it
records the status and cancels the handler's task; the handler catches the cancellation and
answers with that status. Handlers are written as coroutines (reader/writer API) rather than
async generators so that every await of theirs is in their own frame and the cancellation
always lands where they catch it, and they write with :func:`write_whole`, so that the
cancellation never leaves a write half-done under the status (gRPC refuses a status while a
message is still being sent). No I/O here but that write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from common.schedulerlink import INSTANCE_HEADER
from scheduler.auth import Credential, Principal

MAX_INSTANCE_CHARS = 64
#: Fleet watches one gateway id may hold open at once (one per gateway process, and room for
#: a restart whose old connection the scheduler has not seen close yet).
MAX_WATCHES_PER_GATEWAY = 4


class Refusal(Exception):
    """A stream or registration the rules refuse; the handler answers ``code``, ``detail``."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(eq=False, slots=True)
class Stream:
    """One open Report stream or fleet watch."""

    kind: Literal["report", "watch"]
    credential: Credential
    instance: str
    peer: str
    opened_at: float  # monotonic
    #: Monotonic time of the newest message from the client (reports), else ``opened_at``.
    last_heard: float
    task: asyncio.Task[Any] | None
    #: Set by :meth:`close`: the status the handler answers with.
    closing: tuple[grpc.StatusCode, str] | None = field(default=None)

    @property
    def principal(self) -> Principal:
        return self.credential.principal

    def close(self, code: grpc.StatusCode, detail: str) -> bool:
        """End the stream with ``code``; False when it was already being closed."""
        if self.closing is not None:
            return False
        self.closing = (code, detail)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        return True


async def write_whole(context: grpc.aio.ServicerContext[Any, Any], message: Any) -> None:
    """Write ``message``; a cancellation meanwhile lets the write finish, then is raised."""
    write = asyncio.ensure_future(context.write(message))
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await write
        raise


def instance_of(metadata: Any) -> str:
    """The ``spillway-instance`` header of a call; "" when absent.

    Raises :class:`Refusal` (INVALID_ARGUMENT) for a value that is not a short plain id.
    """
    for key, value in metadata or ():
        if key != INSTANCE_HEADER:
            continue
        if (
            not isinstance(value, str)
            or not 0 < len(value) <= MAX_INSTANCE_CHARS
            or not value.replace("-", "").replace("_", "").isalnum()
            or not value.isascii()
        ):
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the {INSTANCE_HEADER} header must be 1 to {MAX_INSTANCE_CHARS} letters, "
                "digits, '-' or '_'",
            )
        return value
    return ""


def _same_process(a: str, b: str) -> bool:
    return bool(a) and a == b


class StreamRegistry:
    """Open streams by holder, and the rules above."""

    def __init__(
        self,
        silence_limit_s: float,
        *,
        max_watches: int = MAX_WATCHES_PER_GATEWAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.silence_limit_s = silence_limit_s
        self.max_watches = max_watches
        self._clock = clock
        self._reports: dict[str, Stream] = {}
        self._watches: dict[str, list[Stream]] = {}

    @property
    def open_reports(self) -> int:
        return len(self._reports)

    @property
    def open_watches(self) -> int:
        return sum(len(w) for w in self._watches.values())

    def report_stream(self, agent_id: str) -> Stream | None:
        """The Report stream that holds ``agent_id``, if one is open."""
        return self._reports.get(agent_id)

    def _live(self, stream: Stream, now: float) -> bool:
        return stream.closing is None and now - stream.last_heard <= self.silence_limit_s

    def _held(self, holder: Stream, now: float) -> Refusal:
        silent = now - holder.last_heard
        return Refusal(
            grpc.StatusCode.ALREADY_EXISTS,
            f"agent {holder.principal.id!r} is already connected from another process "
            f"(instance {holder.instance or 'unnamed'} at {holder.peer}, heard {silent:.1f}s "
            f"ago); a second process with the same id is refused until the first has been "
            f"silent for {self.silence_limit_s:.1f}s",
        )

    def check_register(self, agent_id: str, instance: str) -> Stream | None:
        """Whether a process with ``instance`` may register ``agent_id`` now.

        Raises :class:`Refusal` while another process holds the id. Returns the silent stream
        of another process that this registration takes the id over from (the caller closes
        it, loudly), else None.
        """
        holder = self._reports.get(agent_id)
        if holder is None or _same_process(holder.instance, instance):
            return None
        now = self._clock()
        if self._live(holder, now):
            raise self._held(holder, now)
        return holder

    def open_report(
        self, credential: Credential, instance: str, peer: str, task: asyncio.Task[Any] | None
    ) -> tuple[Stream, Stream | None]:
        """Register a new Report stream for the credential's agent id.

        Returns the stream and the one it replaces (the same process reconnecting, or a
        process silent past the limit), which the caller closes. Raises :class:`Refusal` while
        another live process holds the id.
        """
        agent_id = credential.principal.id
        now = self._clock()
        holder = self._reports.get(agent_id)
        if (
            holder is not None
            and not _same_process(holder.instance, instance)
            and self._live(holder, now)
        ):
            raise self._held(holder, now)
        stream = Stream("report", credential, instance, peer, now, now, task)
        self._reports[agent_id] = stream
        return stream, holder

    def heard(self, stream: Stream) -> None:
        stream.last_heard = self._clock()

    def open_watch(
        self, credential: Credential, peer: str, task: asyncio.Task[Any] | None
    ) -> Stream:
        """Register a new fleet watch; :class:`Refusal` (RESOURCE_EXHAUSTED) past the bound."""
        gateway_id = credential.principal.id
        watches = self._watches.setdefault(gateway_id, [])
        if len(watches) >= self.max_watches:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"gateway {gateway_id!r} already has {len(watches)} fleet watches open, the "
                f"most one gateway id may hold",
            )
        now = self._clock()
        stream = Stream("watch", credential, "", peer, now, now, task)
        watches.append(stream)
        return stream

    def forget(self, stream: Stream) -> None:
        """The stream ended; idempotent, and a no-op for a stream already replaced."""
        principal_id = stream.principal.id
        if stream.kind == "report":
            if self._reports.get(principal_id) is stream:
                del self._reports[principal_id]
            return
        watches = self._watches.get(principal_id)
        if watches is not None and stream in watches:
            watches.remove(stream)
            if not watches:
                del self._watches[principal_id]

    def streams(self) -> Iterator[Stream]:
        """Every open stream (a snapshot: closing them while iterating is safe)."""
        yield from list(self._reports.values())
        yield from [w for watches in list(self._watches.values()) for w in watches]

    def silent(self) -> list[Stream]:
        """Report streams whose client has sent nothing for longer than the silence limit."""
        now = self._clock()
        return [
            s
            for s in list(self._reports.values())
            if s.closing is None and now - s.last_heard > self.silence_limit_s
        ]

    def revoked(self, principal_of: Callable[[str], Principal | None]) -> list[Stream]:
        """Streams whose token no longer names the principal that opened them."""
        return [
            s
            for s in self.streams()
            if s.closing is None and principal_of(s.credential.token_hash) != s.principal
        ]
