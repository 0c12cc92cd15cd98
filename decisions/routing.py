"""Where one request goes: a pure function over an immutable view of a deployment's targets.

:func:`route` is the whole decision, called by the live gateway for every request, by the
simulator for every simulated request, and by the property tests, so that the three cannot
disagree. The caller owns everything that changes: the in-flight counts, the queue, the bytes.

The order, for every request:

1. Only targets inside the deployment's residency lock are candidates, ever: a reserved
   replica by its agent's ``residency_group`` label, a rented one by its (cloud, region), a
   managed endpoint by its residency group. This is the fourth residency check, after
   placement, the provider adapter and Terraform, and like them it refuses rather than falls
   back: a target outside the lock is not used even when it is the only one.
2. Targets that take no new requests (draining, unhealthy, at their cap, or already tried for
   this request) are skipped.
3. Reserved replicas first, then rented replicas, then managed endpoints. Within a replica
   tier, a request with an affinity key (a session, or its prompt's beginning) goes back to
   the replica that served its key last (its ``home``: that replica holds the conversation's
   KV cache), else to the replica that ranks highest for the key by rendezvous hashing; in
   either case only while that keeps the replica within ``max_load_factor`` times the tier's
   mean load (bounded-load consistent hashing), else the next in the key's order, and so on.
   Without a key: the replica with the fewest requests in flight. Among managed endpoints:
   the cheapest with room.
4. Nothing with room: the request queues (the caller's bounded queue decides how long).

No I/O, no clock, no randomness: the same view and request always give the same answer.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from decisions.policy import Lock


class Tier(enum.IntEnum):
    """In routing order: a lower tier is always tried first."""

    RESERVED = 0
    RENTED = 1
    MANAGED = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Target:
    """A replica or managed endpoint, as routing sees it at one moment."""

    target_id: str
    tier: Tier
    #: Residency group: the agent's label for a replica, the endpoint's own for a managed one.
    residency_group: str = ""
    #: Where a rented replica runs (a reserved one's cloud is "onprem" or similar).
    cloud: str = ""
    region: str = ""
    in_flight: int = 0
    #: Requests in flight at most (the smaller of the policy's and the replica's own cap).
    cap: int = 1
    #: False while draining, unhealthy or not yet started: it takes nothing new.
    accepting: bool = True
    #: Managed endpoints: list price of a million output tokens, for choosing among them.
    usd_per_million_tokens: float = 0.0

    @property
    def has_room(self) -> bool:
        return self.accepting and self.in_flight < self.cap


@dataclass(frozen=True, slots=True)
class Request:
    #: Session or prompt-prefix key; None routes by load alone.
    affinity_key: str | None = None
    #: Targets already tried for this request (a retry must go elsewhere).
    exclude: frozenset[str] = frozenset()
    #: The target that served this affinity key last (the caller remembers it), if any.
    home: str | None = None


@dataclass(frozen=True, slots=True)
class Routed:
    target: Target
    reason: str


@dataclass(frozen=True, slots=True)
class Queued:
    reason: str


Decision = Routed | Queued


def inside_lock(target: Target, lock: Lock) -> bool:
    """Whether ``target`` may serve a deployment locked by ``lock``: the one residency rule."""
    if target.tier is Tier.RESERVED:
        return lock.allows_agent(target.residency_group)
    if target.tier is Tier.RENTED:
        return lock.allows_region(target.cloud, target.region)
    return lock.allows_group(target.residency_group)


def route(
    targets: Sequence[Target],
    lock: Lock,
    request: Request | None = None,
    *,
    max_load_factor: float = 1.25,
) -> Decision:
    """The target for ``request`` among ``targets``, or :class:`Queued` with the reason."""
    request = request or Request()
    allowed = [t for t in targets if inside_lock(t, lock)]
    outside = len(targets) - len(allowed)
    for tier in Tier:
        members = [t for t in allowed if t.tier is tier]
        open_ = [t for t in members if t.has_room and t.target_id not in request.exclude]
        if not open_:
            continue
        if tier is Tier.MANAGED:
            chosen = min(open_, key=lambda t: (t.usd_per_million_tokens, t.in_flight, t.target_id))
            return Routed(chosen, "replicas full; cheapest managed endpoint with room")
        if request.affinity_key is None:
            chosen = min(open_, key=_by_load)
            return Routed(chosen, f"{tier.label}: fewest in flight")
        return _by_affinity(tier, members, open_, request, max_load_factor)
    if not allowed:
        why = "no target inside the residency lock" if outside else "no replica yet"
        return Queued(why + (f" ({outside} outside it not used)" if outside else ""))
    return Queued("every target inside the lock is full, draining or already tried")


def _by_load(target: Target) -> tuple[float, int, str]:
    return (target.in_flight / target.cap, target.in_flight, target.target_id)


def _by_affinity(
    tier: Tier, members: list[Target], open_: list[Target], request: Request, factor: float
) -> Routed:
    """The key's home, else rendezvous hashing, with a load bound: the first replica whose load
    stays within ``factor`` times the tier's mean after taking this request."""
    accepting = [t for t in members if t.accepting]
    mean = (sum(t.in_flight for t in accepting) + 1) / max(len(accepting), 1)
    bound = max(1, math.ceil(factor * mean))
    for target in open_:
        if target.target_id == request.home and target.in_flight + 1 <= bound:
            return Routed(target, f"{tier.label}: affinity, back to the replica it used last")
    key = request.affinity_key or ""
    ranked = sorted(open_, key=lambda t: _rank(key, t.target_id), reverse=True)
    for place, target in enumerate(ranked):
        if target.in_flight + 1 <= bound:
            how = "its own replica" if place == 0 else f"choice {place + 1} (the first are loaded)"
            return Routed(target, f"{tier.label}: affinity, {how}")
    chosen = min(open_, key=_by_load)
    return Routed(chosen, f"{tier.label}: affinity bound reached everywhere; fewest in flight")


def _rank(key: str, target_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{target_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
