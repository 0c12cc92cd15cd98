"""The simulated gateway routes with the live gateway's adaptive limit, fed by every request a
replica serves at its first token."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import pytest

import decisions.routing as routing
import simulator.gateway as gateway
from decisions.admission import AdaptiveLimit, AdmissionSettings
from decisions.endpoints import Admission
from simulator import simulate
from tests.simulator.conftest import bursty_trace, policy, settings, with_gateway, with_managed

STATIC_CAP = 24


class Recording(AdaptiveLimit):
    """The real limiter, remembering every sample and every limit it had."""

    made: ClassVar[list[Recording]] = []

    def __init__(self, s: AdmissionSettings, max_concurrency: int, now: float) -> None:
        super().__init__(s, max_concurrency, now)
        self.samples: list[tuple[float, float]] = []
        self.seen: list[float] = [self.limit]
        Recording.made.append(self)

    def sample(self, ttft_s: float, now: float, in_flight: int) -> None:
        super().sample(ttft_s, now, in_flight)
        self.samples.append((ttft_s, now))
        self.seen.append(self.limit)

    def cap(self, now: float, in_flight: int, oldest_waiting_s: float = 0.0) -> int:
        got = super().cap(now, in_flight, oldest_waiting_s)
        self.seen.append(self.limit)
        return got


def _run(
    monkeypatch: pytest.MonkeyPatch, admission: Admission
) -> tuple[dict[str, Any], Any, list[routing.Decision], list[list[routing.Target]]]:
    Recording.made = []
    monkeypatch.setattr(gateway, "AdaptiveLimit", Recording)
    decisions: list[routing.Decision] = []
    views: list[list[routing.Target]] = []

    def recording(targets: list[routing.Target], *args: Any, **kwargs: Any) -> routing.Decision:
        decision = routing.route(targets, *args, **kwargs)
        decisions.append(decision)
        views.append(list(targets))
        return decision

    monkeypatch.setattr(gateway, "route", recording)
    p = with_gateway(
        with_managed(policy(enabled=False), max_concurrency=64),
        max_concurrency_per_replica=STATIC_CAP,
        admission=admission,
    )
    trace = bursty_trace(minutes=10, busy=8.0)
    sim = simulate(p, trace, settings(reserved={"machines": 1}), scenarios=("policy",))
    return sim.summaries["policy"], sim.results["policy"].cluster, decisions, views


def _overflow_below_the_cap(
    decisions: list[routing.Decision], views: list[list[routing.Target]]
) -> int:
    """Requests sent to the managed endpoint while a replica had fewer than the static cap."""
    count = 0
    for decision, view in zip(decisions, views, strict=True):
        if isinstance(decision, routing.Routed) and decision.target.tier is routing.Tier.MANAGED:
            replicas = [t for t in view if t.tier is not routing.Tier.MANAGED]
            count += any(t.in_flight < STATIC_CAP for t in replicas)
    return count


def test_every_first_token_feeds_the_limit_and_routing_uses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admission = Admission(target_share=0.5, initial_concurrency=8)
    s, c, decisions, views = _run(monkeypatch, admission)
    g = c.gateway
    assert len(Recording.made) == len(g.limits) >= 1
    samples = [x for limit in Recording.made for x in limit.samples]
    # One sample per request a replica served, at its first token.
    assert len(samples) == g.samples == s["served_on_reserved"] + s["served_on_rented"] > 0
    assert not any(g.waiting_first.values())  # every one got its first token
    # Requests that never waited at the gateway: the sample is their own time to first token.
    direct = {
        round(c.ttft[i], 9)
        for i in range(len(c.trace))
        if c.outcome[i] in (gateway.RESERVED, gateway.SPILLED)
    }
    assert sum(round(ttft, 9) in direct for ttft, _ in samples) >= 0.5 * len(samples)
    # The limit moved both ways (up from 8 on fast first tokens, down on slow ones), within
    # its bounds.
    seen = [x for limit in Recording.made for x in limit.seen]
    assert max(seen) > 8 and min(seen) >= 2 and max(seen) <= STATIC_CAP
    cuts = [b < a for limit in Recording.made for a, b in itertools.pairwise(limit.seen)]
    assert any(cuts)
    assert any(ttft > 0.5 * settings().ttft_slo_s for ttft, _ in samples)
    # Routing saw the limit as the replica's cap, and overflowed under the static cap.
    caps = {t.cap for view in views for t in view if t.tier is not routing.Tier.MANAGED}
    assert any(cap < STATIC_CAP for cap in caps)
    assert _overflow_below_the_cap(decisions, views) > 0
    assert s["served_on_managed"] > 0


def test_without_adaptive_admission_only_the_static_cap_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, c, decisions, views = _run(monkeypatch, Admission(adaptive=False))
    assert Recording.made == [] and c.gateway.limits == {} and c.gateway.samples == 0
    caps = {t.cap for view in views for t in view if t.tier is not routing.Tier.MANAGED}
    assert caps == {STATIC_CAP}
    assert _overflow_below_the_cap(decisions, views) == 0
