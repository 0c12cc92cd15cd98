"""decisions.routing: residency, tier order, room, and bounded-load affinity, property-tested."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decisions.policy import UNLOCKED, Lock
from decisions.routing import Queued, Request, Routed, Target, Tier, inside_lock, route

GROUPS = ["eu", "us", "uk", ""]
CLOUDS = ["aws", "gcp", "azure", "onprem"]
REGIONS = ["r1", "r2", "r3"]


@st.composite
def targets(draw: st.DrawFn) -> Target:
    tier = draw(st.sampled_from(list(Tier)))
    cap = draw(st.integers(1, 8))
    return Target(
        target_id=draw(st.text("abcdefgh", min_size=1, max_size=3)),
        tier=tier,
        residency_group=draw(st.sampled_from(GROUPS)),
        cloud=draw(st.sampled_from(CLOUDS)),
        region=draw(st.sampled_from(REGIONS)),
        in_flight=draw(st.integers(0, cap + 1)),
        cap=cap,
        accepting=draw(st.booleans()),
        usd_per_million_tokens=draw(st.sampled_from([0.5, 1.0, 3.0])),
    )


@st.composite
def locks(draw: st.DrawFn) -> Lock:
    if draw(st.integers(0, 4)) == 0:
        return UNLOCKED
    name = draw(st.sampled_from(GROUPS[:3]))
    pairs = draw(st.frozensets(st.tuples(st.sampled_from(CLOUDS), st.sampled_from(REGIONS))))
    labels = draw(st.frozensets(st.sampled_from(GROUPS), max_size=2))
    return Lock(name, pairs, labels | {name})


def unique(fleet: list[Target]) -> list[Target]:
    seen: dict[str, Target] = {}
    for t in fleet:
        seen.setdefault(t.target_id, t)
    return list(seen.values())


requests = st.builds(
    Request,
    affinity_key=st.one_of(st.none(), st.text("xyz", max_size=4)),
    exclude=st.frozensets(st.text("abcdefgh", min_size=1, max_size=3), max_size=3),
    home=st.one_of(st.none(), st.text("abcdefgh", min_size=1, max_size=3)),
)


@settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(targets(), max_size=12).map(unique), locks(), requests, st.floats(1.0, 3.0))
def test_routing_properties(
    fleet: list[Target], lock: Lock, request: Request, factor: float
) -> None:
    """Hypothesis explores (and shrinks a failure to its smallest fleet)."""
    check_decision(fleet, lock, request, factor)


def test_routing_properties_on_ten_thousand_fleets() -> None:
    """The same properties on 10,000 more fleets and locks, drawn from a fixed seed (fast)."""
    rng = random.Random(20261201)
    for _ in range(10_000):
        fleet = unique([_random_target(rng) for _ in range(rng.randint(0, 12))])
        lock = _random_lock(rng)
        key = rng.choice([None, "x", "y", "xy", "zzz"])
        exclude = frozenset(rng.sample("abcdefgh", rng.randint(0, 2)))
        home = rng.choice([None, *(t.target_id for t in fleet)])
        check_decision(fleet, lock, Request(key, exclude, home), rng.uniform(1.0, 3.0))


def _random_target(rng: random.Random) -> Target:
    cap = rng.randint(1, 8)
    return Target(
        target_id="".join(rng.choices("abcdefgh", k=rng.randint(1, 2))),
        tier=rng.choice(list(Tier)),
        residency_group=rng.choice(GROUPS),
        cloud=rng.choice(CLOUDS),
        region=rng.choice(REGIONS),
        in_flight=rng.randint(0, cap + 1),
        cap=cap,
        accepting=rng.random() < 0.8,
        usd_per_million_tokens=rng.choice([0.5, 1.0, 3.0]),
    )


def _random_lock(rng: random.Random) -> Lock:
    if rng.random() < 0.2:
        return UNLOCKED
    name = rng.choice(GROUPS[:3])
    pairs = {(rng.choice(CLOUDS), rng.choice(REGIONS)) for _ in range(rng.randint(0, 5))}
    labels = set(rng.sample(GROUPS, rng.randint(0, 2))) | {name}
    return Lock(name, frozenset(pairs), frozenset(labels))


def check_decision(fleet: list[Target], lock: Lock, request: Request, factor: float) -> None:
    decision = route(fleet, lock, request, max_load_factor=factor)
    assert route(fleet, lock, request, max_load_factor=factor) == decision  # deterministic
    usable = [
        t
        for t in fleet
        if inside_lock(t, lock) and t.has_room and t.target_id not in request.exclude
    ]
    if isinstance(decision, Queued):
        assert not usable, f"queued although {usable} had room"
        return
    chosen = decision.target
    # Residency: never a target outside the lock, whatever else is (or is not) there.
    assert inside_lock(chosen, lock)
    assert chosen.has_room and chosen.target_id not in request.exclude
    # Tier order: nothing usable in a lower tier.
    assert chosen.tier == min(t.tier for t in usable)
    # Bounded load within a replica tier.
    if chosen.tier is not Tier.MANAGED and request.affinity_key is not None:
        members = [t for t in fleet if inside_lock(t, lock) and t.tier is chosen.tier]
        accepting = [t for t in members if t.accepting]
        bound = max(
            1, math.ceil(factor * (sum(t.in_flight for t in accepting) + 1) / len(accepting))
        )
        tier_usable = [t for t in usable if t.tier is chosen.tier]
        if any(t.in_flight + 1 <= bound for t in tier_usable):
            assert chosen.in_flight + 1 <= bound


def test_a_target_outside_the_lock_is_never_used_even_alone() -> None:
    lock = Lock("eu", frozenset({("aws", "eu-north-1")}), frozenset({"eu"}))
    outside = [
        Target("us-reserved", Tier.RESERVED, residency_group="us", cap=8),
        Target("us-rented", Tier.RENTED, cloud="aws", region="us-east-1", cap=8),
        Target("us-managed", Tier.MANAGED, residency_group="us", cap=8),
    ]
    decision = route(outside, lock)
    assert isinstance(decision, Queued) and "outside" in decision.reason
    inside = Target("eu-rented", Tier.RENTED, cloud="aws", region="eu-north-1", cap=8)
    decision = route([*outside, inside], lock)
    assert isinstance(decision, Routed) and decision.target.target_id == "eu-rented"


def test_reserved_then_rented_then_managed_then_queue() -> None:
    reserved = Target("res", Tier.RESERVED, cap=2)
    rented = Target("rent", Tier.RENTED, cap=2)
    cheap = Target("cheap", Tier.MANAGED, cap=1, usd_per_million_tokens=1.0)
    dear = Target("dear", Tier.MANAGED, cap=1, usd_per_million_tokens=5.0)
    fleet = [dear, cheap, rented, reserved]
    order = []
    for _ in range(7):
        decision = route(fleet, UNLOCKED)
        if isinstance(decision, Queued):
            order.append("queue")
            break
        order.append(decision.target.target_id)
        fleet = [
            replace(t, in_flight=t.in_flight + 1) if t.target_id == decision.target.target_id else t
            for t in fleet
        ]
    assert order == ["res", "res", "rent", "rent", "cheap", "dear", "queue"]


def test_a_draining_replica_and_a_tried_one_get_nothing() -> None:
    draining = Target("a", Tier.RESERVED, cap=8, accepting=False)
    tried = Target("b", Tier.RESERVED, cap=8)
    other = Target("c", Tier.RENTED, cap=8, in_flight=7)
    decision = route([draining, tried, other], UNLOCKED, Request(exclude=frozenset({"b"})))
    assert isinstance(decision, Routed) and decision.target.target_id == "c"


def test_affinity_keeps_a_conversation_and_spreads_conversations() -> None:
    fleet = [Target(f"r{i}", Tier.RESERVED, cap=1000) for i in range(8)]
    first = route(fleet, UNLOCKED, Request("session-42"))
    again = route(fleet, UNLOCKED, Request("session-42"))
    assert isinstance(first, Routed) and isinstance(again, Routed)
    assert first.target == again.target
    homes = Counter(
        d.target.target_id
        for k in range(800)
        if isinstance(d := route(fleet, UNLOCKED, Request(f"s{k}")), Routed)
    )
    assert len(homes) == 8 and max(homes.values()) < 2 * 100


def test_the_load_bound_holds_as_requests_pile_up() -> None:
    """Keys that all prefer one replica: it never takes more than 1.25x the mean (+1)."""
    in_flight = dict.fromkeys((f"r{i}" for i in range(4)), 0)
    for n in range(2000):
        fleet = [Target(k, Tier.RESERVED, in_flight=v, cap=10_000) for k, v in in_flight.items()]
        decision = route(fleet, UNLOCKED, Request("same-system-prompt" if n % 2 else f"k{n % 7}"))
        assert isinstance(decision, Routed)
        in_flight[decision.target.target_id] += 1
        mean = sum(in_flight.values()) / len(in_flight)
        assert max(in_flight.values()) <= math.ceil(1.25 * mean) + 1


def test_a_conversation_goes_back_to_its_home_while_the_bound_allows() -> None:
    fleet = [Target(f"r{i}", Tier.RESERVED, cap=100) for i in range(4)]
    first = route(fleet, UNLOCKED, Request("chat-7"))
    assert isinstance(first, Routed)
    other = next(t for t in fleet if t != first.target)
    back = route(fleet, UNLOCKED, Request("chat-7", home=other.target_id))
    assert isinstance(back, Routed) and back.target == other and "used last" in back.reason
    # The home is loaded past the bound: the key's own order decides instead.
    loaded = [replace(t, in_flight=9) if t == other else t for t in fleet]
    moved = route(loaded, UNLOCKED, Request("chat-7", home=other.target_id))
    assert isinstance(moved, Routed) and moved.target.target_id != other.target_id
