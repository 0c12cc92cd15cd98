"""The cost model of spilling: a rented replica against its traffic on a managed endpoint.

A deployment whose residency lock holds a managed endpoint has two places for traffic its
reserved replicas cannot take: the endpoint (paid per token, ready now) or a rented replica
(paid per hour, ready after a cold start, billed for a minimum). This module prices both. The
symbols, with the policy field each comes from (``autoscaling.costs`` unless said otherwise):

====  ======================================================================================
p     USD per token on the endpoint: ``(s * P_in + (1 - s) * P_out) / 1e6``, with ``s`` =
      ``input_token_share`` and ``P_in``, ``P_out`` its prices per million tokens; the
      cheapest endpoint inside the lock counts (the gateway picks the cheapest too)
O     overflow now: tokens per second (input and output) the gateways send to managed
      endpoints
T     tokens per second one replica carries within the SLO: while the gateways overflow
      (so the replicas are full) and the healthy replicas report what they generate, their
      mean generated tokens per second over ``1 - s``; else ``replica_tokens_per_s``
C     ``cold_start_s``: from the decision until the replica serves
M     ``billing_minimum_s``
h     the offer's list price, USD per hour
a     age of the current overflow episode, seconds
H     durations of the last episodes (``episodes_s`` of the plan input); the prior
      ``expected_episode_s`` stands in for them while there are none
====  ======================================================================================

Renting (:func:`rent_case`):

* remaining episode ``R(a)`` = mean of ``D - a`` over the ``D`` in ``H`` longer than ``a``;
  when none is longer, ``a`` itself (an episode that outlasted all seen is expected to go on
  about as long again);
* useful life ``L = max(0, R - C)``: the replica serves only after its cold start;
* the ``k``-th new replica carries ``x_k = min(T, max(0, O - (k - 1) * T))`` (the first ones
  are full, the last one carries what is left);
* the managed spend it saves ``S_k = x_k * p * L``;
* its rental ``K = h / 3600 * max(L + C, M)``: the cold start is paid for too;
* rent the ``k``-th replica only when ``S_k > K``.

Releasing (:func:`release_case`), for a rented replica with ``l`` requests in flight, when
replicas take ``q`` requests each (``gateway.max_concurrency_per_replica``, else
:data:`DEFAULT_REPLICA_CONCURRENCY`) and the reserved replicas have ``F`` requests of room:

* the reserved replicas take ``t = min(l, F / X)`` (``X`` = ``release_ratio``: they are not
  filled past ``1/X`` of their room), the rest ``m = l - t`` moves to the endpoint;
* that costs ``A = m * r * p * 3600`` USD per hour, ``r`` the tokens per second a request
  brings: the replica's own reported rate over ``l`` when it reports one (generated tokens
  per second over ``1 - s``: the gateways count input and output), else ``T / q``; keeping
  the replica costs ``B = h``;
* the replica is cheaper to release when ``B > X * A`` and ``m`` fits the endpoints' free
  concurrency taken at ``1/X`` too (otherwise requests would queue: never cheaper);
* it is released once that has held for ``release_after_s`` (the caller keeps the time);
  a machine whose price is unknown (``h = 0``) is never released by cost.

Between the two rules lies a band (renting needs ``O * p > h * (L + C) / L``, releasing
``O * p < h / X``), so the decision does not flap on a noisy signal, and a replica that
carries little traffic is released whatever the windowed signal does.

Pure functions over numbers: no I/O, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from decisions.endpoints import ManagedEndpoint

#: Requests a replica takes at once when ``gateway.max_concurrency_per_replica`` is unset.
DEFAULT_REPLICA_CONCURRENCY = 64
#: Episode durations kept for the estimate (the newest).
EPISODES_KEPT = 32


def usd_per_token(endpoint: ManagedEndpoint, input_share: float) -> float:
    """``p``: the endpoint's input and output prices blended by ``input_share``, per token."""
    return (
        input_share * endpoint.usd_per_million_input_tokens
        + (1.0 - input_share) * endpoint.usd_per_million_output_tokens
    ) / 1e6


def cheapest_endpoint(
    endpoints: Sequence[ManagedEndpoint], input_share: float
) -> ManagedEndpoint | None:
    """The endpoint with the lowest blended price (first listed on a tie); None when none."""
    best: ManagedEndpoint | None = None
    for endpoint in endpoints:
        if best is None or usd_per_token(endpoint, input_share) < usd_per_token(best, input_share):
            best = endpoint
    return best


def remaining_episode_s(age_s: float, history: Sequence[float], prior_s: float) -> float:
    """``R(a)``: how much longer the current episode is expected to last."""
    durations = list(history) or [prior_s]
    longer = [d - age_s for d in durations if d > age_s]
    if longer:
        return sum(longer) / len(longer)
    return max(age_s, 0.0)


@dataclass(frozen=True, slots=True)
class RentCase:
    """The numbers of one rent decision (see the module's formulas)."""

    #: New replicas the cost model pays for (0 .. the count asked).
    rent: int
    overflow_tokens_per_s: float
    usd_per_token: float
    remaining_s: float
    useful_life_s: float
    #: Managed spend the first replica saves over its useful life (``S_1``).
    saved_usd: float
    #: What renting that replica costs (``K``).
    rental_usd: float
    cold_start_s: float
    endpoint: str

    def describe(self) -> str:
        """One line, with the numbers."""
        hourly = min(self.overflow_tokens_per_s, _first_carry(self)) * self.usd_per_token * 3600
        head = (
            f"managed overflow {_tokens(self.overflow_tokens_per_s)} tok/s on {self.endpoint} "
            f"≈ ${hourly:.2f}/h; over the expected {self.remaining_s:.0f}s left of the episode "
            f"a replica would serve {self.useful_life_s:.0f}s and save ${self.saved_usd:.2f}"
        )
        compare = ">" if self.rent else "<="
        tail = f"rental ${self.rental_usd:.2f} incl. {self.cold_start_s:.0f}s cold start"
        if self.rent:
            return f"{head} {compare} {tail}; renting {self.rent}"
        return f"{head} {compare} {tail}; staying on {self.endpoint}"


def _first_carry(case: RentCase) -> float:
    if case.useful_life_s <= 0 or case.usd_per_token <= 0:
        return case.overflow_tokens_per_s
    return case.saved_usd / (case.usd_per_token * case.useful_life_s)


def _tokens(rate: float) -> str:
    return f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"


def rental_usd(
    usd_per_hour: float, useful_life_s: float, cold_start_s: float, minimum_s: float
) -> float:
    """``K = h / 3600 * max(L + C, M)``."""
    return usd_per_hour / 3600.0 * max(useful_life_s + cold_start_s, minimum_s)


def rent_case(
    *,
    asked: int,
    overflow_tokens_per_s: float,
    endpoint: ManagedEndpoint,
    input_share: float,
    replica_tokens_per_s: float,
    usd_per_hour: float,
    episode_age_s: float,
    episodes_s: Sequence[float],
    prior_episode_s: float,
    cold_start_s: float,
    billing_minimum_s: float,
) -> RentCase:
    """How many of ``asked`` new replicas pay for themselves against the managed endpoint."""
    price = usd_per_token(endpoint, input_share)
    remaining = remaining_episode_s(episode_age_s, episodes_s, prior_episode_s)
    life = max(0.0, remaining - cold_start_s)
    rental = rental_usd(usd_per_hour, life, cold_start_s, billing_minimum_s)
    rent = 0
    saved_first = 0.0
    for k in range(1, max(asked, 1) + 1):
        carried = min(
            replica_tokens_per_s, max(0.0, overflow_tokens_per_s - (k - 1) * replica_tokens_per_s)
        )
        saved = carried * price * life
        if k == 1:
            saved_first = saved
        if k > asked or life <= 0 or saved <= rental:
            break
        rent = k
    return RentCase(
        rent=rent,
        overflow_tokens_per_s=overflow_tokens_per_s,
        usd_per_token=price,
        remaining_s=remaining,
        useful_life_s=life,
        saved_usd=saved_first,
        rental_usd=rental,
        cold_start_s=cold_start_s,
        endpoint=endpoint.name,
    )


@dataclass(frozen=True, slots=True)
class ReleaseCase:
    """The numbers of one release judgement (see the module's formulas)."""

    replica_id: str
    cheaper: bool
    in_flight: float
    to_reserved: float
    to_managed: float
    keep_usd_per_hour: float
    managed_usd_per_hour: float
    ratio: float
    #: Why not, when the moved requests would not fit anywhere.
    blocked: str = ""

    def describe(self) -> str:
        """One line, with the numbers."""
        moved = (
            f"its {self.in_flight:g} requests in flight: {self.to_reserved:g} to free reserved "
            f"room, {self.to_managed:g} to managed at ${self.managed_usd_per_hour:.2f}/h"
        )
        if self.blocked:
            return f"{self.replica_id} is needed: {moved}, but {self.blocked}"
        compare = ">" if self.cheaper else "<="
        verdict = "cheaper to release" if self.cheaper else "worth keeping"
        return (
            f"{self.replica_id} {verdict}: ${self.keep_usd_per_hour:.2f}/h {compare} "
            f"{self.ratio:g}x ${self.managed_usd_per_hour:.2f}/h for {moved}"
        )


def release_case(
    *,
    replica_id: str,
    in_flight: float,
    keep_usd_per_hour: float,
    reserved_room: float,
    managed_room: float,
    replica_concurrency: int,
    replica_tokens_per_s: float,
    usd_per_token: float | None,
    ratio: float,
    carried_tokens_per_s: float | None = None,
) -> ReleaseCase:
    """Whether the rented replica ``replica_id`` is cheaper to release than to keep.

    ``reserved_room`` and ``managed_room`` are free requests (of concurrency) on the reserved
    replicas and on the managed endpoints inside the lock; ``usd_per_token`` is None when no
    managed endpoint is inside the lock (then only free reserved room can take the traffic);
    ``carried_tokens_per_s`` is what the replica carries when it is known (input and output).
    """
    load = max(0.0, in_flight)
    to_reserved = min(load, max(0.0, reserved_room) / ratio)
    to_managed = load - to_reserved
    if carried_tokens_per_s is not None and carried_tokens_per_s > 0 and load > 0:
        per_request = carried_tokens_per_s / load
    else:
        per_request = replica_tokens_per_s / max(replica_concurrency, 1)
    price = usd_per_token if usd_per_token is not None else 0.0
    managed_hourly = to_managed * per_request * price * 3600.0
    blocked = ""
    if to_managed > 1e-9:
        if usd_per_token is None:
            blocked = "no managed endpoint inside the lock takes what reserved room cannot"
        elif to_managed > max(0.0, managed_room) / ratio + 1e-9:
            blocked = (
                f"the managed endpoints have room for {max(0.0, managed_room):g} "
                f"(used up to 1/{ratio:g})"
            )
    cheaper = not blocked and keep_usd_per_hour > ratio * managed_hourly + 1e-12
    return ReleaseCase(
        replica_id=replica_id,
        cheaper=cheaper,
        in_flight=load,
        to_reserved=to_reserved,
        to_managed=to_managed,
        keep_usd_per_hour=keep_usd_per_hour,
        managed_usd_per_hour=managed_hourly,
        ratio=ratio,
        blocked=blocked,
    )


@dataclass(frozen=True, slots=True)
class Episodes:
    """The overflow episodes as the caller keeps them between steps."""

    #: When the current episode began; None between episodes.
    started_at: float | None
    #: The newest step that saw it active.
    seen_at: float | None
    #: Durations of the finished ones, oldest first, at most :data:`EPISODES_KEPT`.
    durations_s: tuple[float, ...]

    def age_s(self, now: float) -> float:
        return 0.0 if self.started_at is None else max(0.0, now - self.started_at)


def track_episode(
    active: bool,
    now: float,
    started_at: float | None,
    seen_at: float | None,
    durations_s: Sequence[float],
    gap_s: float,
) -> Episodes:
    """The episodes after a step that found overflow ``active`` (or not) at ``now``.

    An episode runs from the first step that sees it to the last, and ends once ``gap_s``
    passed without one; a gap shorter than that belongs to the episode.
    """
    history = tuple(durations_s)[-EPISODES_KEPT:]
    if started_at is not None and seen_at is not None and now - seen_at > gap_s:
        history = (*history, max(0.0, seen_at - started_at))[-EPISODES_KEPT:]
        started_at = seen_at = None
    if active:
        if started_at is None:
            started_at = now
        seen_at = now
    return Episodes(started_at, seen_at, history)


def total_tokens_per_s(generated_tokens_per_s: float, input_share: float) -> float | None:
    """Input and output tokens per second from the generated (output) ones, or None when the
    share leaves no output to scale from."""
    if generated_tokens_per_s <= 0 or input_share >= 1:
        return None
    return generated_tokens_per_s / (1.0 - input_share)


def replicas_for(tokens_per_s: float, replica_tokens_per_s: float) -> int:
    """Replicas it takes to carry ``tokens_per_s``."""
    if tokens_per_s <= 0:
        return 0
    return math.ceil(tokens_per_s / replica_tokens_per_s - 1e-9)
