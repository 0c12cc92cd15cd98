"""Adaptive admission: how many requests one replica may have in flight, from its own latency.

A replica is *full* when one more request would break the deployment's time-to-first-token
target, not at a fixed count. :class:`AdaptiveLimit` keeps that count for one replica with
**AIMD** (additive increase, multiplicative decrease), as in Netflix's concurrency-limits
``AIMDLimit`` and TCP's congestion control (RFC 5681), with time to first token standing in for
the round-trip time:

- The *threshold* is ``target_share x slo.ttft_s``: a first token within it is a **fast**
  sample, one after it a **slow** one. TTFT is measured from the moment the request was sent to
  the replica (a wait in the gateway's queue is not the replica's doing).
- A fast sample adds 1 to the limit, but only while the replica uses at least half of its
  limit (``AIMDLimit``'s rule: an underused replica's samples say nothing about a full one).
- A slow sample sets the limit to ``backoff x min(limit, in flight)``, at most once per
  ``backoff_interval_s`` (requests sent before a cut answer slowly too; they must not cut it
  again). Cutting from the requests in flight rather than from a limit they never reached is
  TCP's ``ssthresh = FlightSize / 2``.
- A request still waiting for its first token after the threshold already counts as a slow
  sample (the caller passes the age of the oldest such request): a stalled replica is noticed
  before any first token arrives.
- Validation: every ``window_s``, a limit above twice the most requests the replica had in
  flight during that window falls to that twice (TCP's congestion window validation, RFC 7661:
  a window nobody used is not known to be safe). Without it a quiet spell would keep the limit
  a busy spell reached, and the next burst would fill all of it before the first slow sample.
- Probe: a replica at its limit that has been sent nothing for ``probe_interval_s`` takes one
  request more, so that a replica whose limit fell is measured again and recovers.

The limit stays within ``[min_concurrency, max]``, ``max`` being the static cap (the policy's
``max_concurrency_per_replica`` and the replica's own ``max_running_requests``, the smaller;
the caller passes it). It starts at ``initial_concurrency``, clamped into those bounds.

Pure: no clock, no I/O, no randomness; every method takes the time it is called at (any
monotonic clock, in seconds). The live gateway and the simulator keep one per replica and feed
it the same way, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from decisions.endpoints import Admission


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """One deployment's limiter parameters (from ``gateway.admission`` and ``slo.ttft_s``)."""

    #: A first token later than this (seconds from sending) is a slow sample.
    threshold_s: float
    min_concurrency: int = 2
    initial_concurrency: int = 16
    #: Slow: the limit becomes ``backoff x min(limit, in flight)``.
    backoff: float = 0.9
    #: At most one cut per this many seconds.
    backoff_interval_s: float = 1.0
    #: A replica at its limit that was sent nothing for this long takes one more.
    probe_interval_s: float = 5.0
    #: Every this many seconds, the limit falls to twice the window's peak in flight if above.
    window_s: float = 5.0

    def __post_init__(self) -> None:
        if not (self.threshold_s > 0 and math.isfinite(self.threshold_s)):
            raise ValueError(f"threshold_s must be a positive number (got {self.threshold_s})")
        if self.min_concurrency < 1:
            raise ValueError(f"min_concurrency must be at least 1 (got {self.min_concurrency})")
        if not 0 < self.backoff < 1:
            raise ValueError(f"backoff must be between 0 and 1 (got {self.backoff})")
        if self.backoff_interval_s < 0 or self.probe_interval_s <= 0 or self.window_s <= 0:
            raise ValueError(
                "backoff_interval_s must be >= 0, probe_interval_s and window_s > 0 "
                f"(got {self.backoff_interval_s}, {self.probe_interval_s}, {self.window_s})"
            )


class AdaptiveLimit:
    """One replica's concurrency limit (see the module docstring for the rules)."""

    __slots__ = ("_last_cut", "_last_sent", "_peak", "_window", "limit", "max", "settings")

    def __init__(self, settings: AdmissionSettings, max_concurrency: int, now: float) -> None:
        self.settings = settings
        self.max = max(1, max_concurrency)
        #: The current limit, fractional (additive increase moves it by fractions).
        self.limit = float(self._bounded(settings.initial_concurrency))
        self._last_cut = -math.inf
        #: When the replica was last sent a request (a new replica counts from now).
        self._last_sent = now
        #: The validation window under way: when it began, the most in flight since.
        self._window = now
        self._peak = 0

    @property
    def floor(self) -> int:
        return min(self.settings.min_concurrency, self.max)

    def _bounded(self, value: float) -> float:
        return min(float(self.max), max(float(self.floor), value))

    def set_max(self, max_concurrency: int) -> None:
        """The static cap changed (a policy edit, a replica reporting its own cap)."""
        self.max = max(1, max_concurrency)
        self.limit = self._bounded(self.limit)

    def sample(self, ttft_s: float, now: float, in_flight: int) -> None:
        """A first token ``ttft_s`` after sending, seen at ``now``, with ``in_flight`` requests
        on the replica (the one just answered included or not: it barely matters)."""
        self._used(now, in_flight)
        if ttft_s > self.settings.threshold_s:
            self._slow(now, in_flight)
        elif in_flight * 2 >= self.limit:
            self.limit = self._bounded(self.limit + 1.0)

    def _used(self, now: float, in_flight: int) -> None:
        if in_flight > self._peak:
            self._peak = in_flight
        if now - self._window >= self.settings.window_s:
            if 2 * self._peak < self.limit:
                self.limit = self._bounded(2.0 * self._peak)
            self._window = now
            self._peak = in_flight

    def _slow(self, now: float, in_flight: int) -> None:
        if now - self._last_cut < self.settings.backoff_interval_s:
            return
        self._last_cut = now
        self.limit = self._bounded(self.settings.backoff * min(self.limit, float(in_flight)))

    def sent(self, now: float) -> None:
        """A request was sent to the replica at ``now``."""
        self._last_sent = now

    def cap(self, now: float, in_flight: int, oldest_waiting_s: float = 0.0) -> int:
        """Requests the replica may have in flight at ``now``: the limit, lowered first when
        the oldest request still waiting for its first token (``oldest_waiting_s`` since it
        was sent; 0 when none waits) is already past the threshold, raised by one when the
        replica is at its limit and was sent nothing for ``probe_interval_s``."""
        self._used(now, in_flight)
        if oldest_waiting_s > self.settings.threshold_s:
            self._slow(now, in_flight)
        cap = max(1, int(self.limit))
        if in_flight >= cap and now - self._last_sent >= self.settings.probe_interval_s:
            return min(self.max, in_flight + 1)
        return cap


def settings_for(admission: Admission, ttft_s: float) -> AdmissionSettings | None:
    """The limiter's settings for a deployment; None when admission is not adaptive."""
    if not admission.adaptive:
        return None
    return AdmissionSettings(
        threshold_s=admission.target_share * ttft_s,
        min_concurrency=admission.min_concurrency,
        initial_concurrency=admission.initial_concurrency,
        backoff=admission.backoff,
        backoff_interval_s=admission.backoff_interval_s,
        probe_interval_s=admission.probe_interval_s,
        window_s=admission.window_s,
    )
