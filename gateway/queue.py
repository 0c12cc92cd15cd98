"""The bounded wait queue of one deployment: where a request waits when nothing has room.

First in, first out. A waiter is handed its grant by :meth:`WaitQueue.pump`, which the owner
calls whenever capacity may have appeared (a slot freed, the fleet changed, a replica passed its
health probe, a warm-up cap grew): each waiter, in order, re-runs its own routing callback, and
the first that gets a target has the slot taken for it there and then, so that no newcomer can
slip past it. A waiter that may use any target stops the pass when it gets nothing (then none
behind it would); one limited to fewer targets (a retry that excludes one, an SGLang
``/generate`` that no managed endpoint serves) does not.

Past ``size`` a request is refused with 429, sheddable ones first: a normal request that finds
the queue full takes the place of the newest sheddable waiter, which is refused instead. Past
``timeout_s`` a waiter is refused with 503. A waiter whose client leaves (its task cancelled)
leaves the queue; one cancelled just after its grant gives the slot back through ``release``.

No routing decision here, no clock beyond the event loop's, no HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

G = TypeVar("G")


class Refused(Exception):
    """The request is turned away: ``status`` 429 (queue full, shed) or 503 (waited too long,
    or nowhere to go); ``reason`` labels the refusal in metrics."""

    def __init__(self, status: int, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


@dataclass(slots=True, eq=False)
class _Waiter(Generic[G]):
    future: asyncio.Future[G]
    try_grant: Callable[[], G | None]
    plain: bool
    sheddable: bool
    since: float


def retry_after_s(timeout_s: float) -> int:
    """What ``Retry-After`` says: a quarter of the queue's timeout, within 1..30 s."""
    return max(1, min(30, round(timeout_s / 4)))


class WaitQueue(Generic[G]):
    def __init__(
        self,
        size: int,
        timeout_s: float,
        release: Callable[[G], None],
        *,
        depth: _Gauge | None = None,
        waited: _Histogram | None = None,
    ) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self._release = release
        self._depth = depth
        self._waited = waited
        self._waiters: deque[_Waiter[G]] = deque()
        self.timeouts = 0
        self.shed = 0
        self.full = 0

    def __len__(self) -> int:
        return len(self._waiters)

    def oldest_s(self, now: float | None = None) -> float:
        if not self._waiters:
            return 0.0
        return (time.monotonic() if now is None else now) - self._waiters[0].since

    def _changed(self) -> None:
        if self._depth is not None:
            self._depth.set(len(self._waiters))

    def _refuse_full(self, sheddable: bool) -> None:
        """Make room for one more, or raise :class:`Refused` (429)."""
        if len(self._waiters) < self.size:
            return
        retry = retry_after_s(self.timeout_s)
        if not sheddable:
            for waiter in reversed(self._waiters):
                if waiter.sheddable and not waiter.future.done():
                    self._waiters.remove(waiter)
                    self.shed += 1
                    waiter.future.set_exception(
                        Refused(
                            429, "shed", "the queue is full; sheddable requests go first", retry
                        )
                    )
                    return
        self.full += 1
        raise Refused(429, "queue_full", f"the queue is full ({self.size} waiting)", retry)

    async def wait(self, try_grant: Callable[[], G | None], *, plain: bool, sheddable: bool) -> G:
        """Wait in line until ``try_grant`` gives something (run by :meth:`pump`)."""
        self._refuse_full(sheddable)
        loop = asyncio.get_running_loop()
        waiter: _Waiter[G] = _Waiter(loop.create_future(), try_grant, plain, sheddable, loop.time())
        self._waiters.append(waiter)
        self._changed()
        fut = waiter.future
        granted = False
        try:
            async with asyncio.timeout(self.timeout_s):
                grant = await fut
            granted = True
            return grant
        except TimeoutError:
            self.timeouts += 1
            raise Refused(
                503,
                "queue_timeout",
                f"no capacity within the queue timeout ({self.timeout_s:g}s)",
                retry_after_s(self.timeout_s),
            ) from None
        finally:
            if self._waiters and waiter in self._waiters:
                self._waiters.remove(waiter)
                self._changed()
            if self._waited is not None:
                self._waited.observe(loop.time() - waiter.since)
            if not granted:
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled() and fut.exception() is None:
                    self._release(fut.result())  # cancelled right after its grant

    def pump(self) -> int:
        """Hand out what has room, in order; the number of waiters granted."""
        if not self._waiters:
            return 0
        granted = 0
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            grant = waiter.try_grant()
            if grant is None:
                if waiter.plain:
                    break
                continue
            self._waiters.remove(waiter)
            waiter.future.set_result(grant)
            granted += 1
        if granted:
            self._changed()
        return granted

    def refuse_all(self, refused: Refused) -> None:
        """Turn every waiter away (its deployment left the policy)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(refused)
        self._changed()
