"""The cost model against small cases worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest

from decisions.costs import (
    EPISODES_KEPT,
    ReleaseCase,
    cheapest_endpoint,
    release_case,
    remaining_episode_s,
    rent_case,
    rental_usd,
    replicas_for,
    total_tokens_per_s,
    track_episode,
    usd_per_token,
)
from decisions.endpoints import ManagedEndpoint


def endpoint(name: str = "hosted-eu", p_in: float = 2.0, p_out: float = 6.0) -> ManagedEndpoint:
    return ManagedEndpoint(
        name=name,
        base_url="https://llm.example.com/v1",
        residency_group="eu",
        usd_per_million_input_tokens=p_in,
        usd_per_million_output_tokens=p_out,
        max_concurrency=64,
    )


def test_the_blended_price_and_the_cheapest_endpoint() -> None:
    # (0.75 * 2.0 + 0.25 * 6.0) / 1e6 = 3.0e-6 USD a token
    assert usd_per_token(endpoint(), 0.75) == pytest.approx(3.0e-6)
    # All output: 6.0e-6; all input: 2.0e-6.
    assert usd_per_token(endpoint(), 0.0) == pytest.approx(6.0e-6)
    assert usd_per_token(endpoint(), 1.0) == pytest.approx(2.0e-6)
    # Blended at 0.75: a = 3.0e-6, b = (0.75 * 1 + 0.25 * 10) / 1e6 = 3.25e-6: a is cheaper;
    # all output: a = 6e-6, b = 10e-6; all input: a = 2e-6, b = 1e-6: b is cheaper.
    a, b = endpoint("a"), endpoint("b", 1.0, 10.0)
    assert cheapest_endpoint([b, a], 0.75) is a
    assert cheapest_endpoint([a, b], 1.0) is b
    assert cheapest_endpoint([], 0.75) is None


def test_the_remaining_episode_from_the_history() -> None:
    # Longer than 150 s: 200 and 900; residuals 50 and 750; mean 400.
    assert remaining_episode_s(150, [100, 200, 900], 600) == pytest.approx(400)
    # None longer than 250 s: as long again (250).
    assert remaining_episode_s(250, [100, 200], 600) == pytest.approx(250)
    # No history: the prior stands in as one episode: 600 - 100 = 500.
    assert remaining_episode_s(100, [], 600) == pytest.approx(500)


def test_rent_as_many_replicas_as_pay_for_themselves() -> None:
    # p = 3e-6 USD/token; O = 10,000 tok/s; T = 4,000 tok/s; h = 28.8 USD/h = 0.008 USD/s;
    # C = 300 s; no history, prior 1,200 s, age 0: R = 1,200 s, L = 900 s.
    # K = 0.008 * max(900 + 300, 60) = 9.60 USD.
    # Replica 1 carries 4,000: S1 = 4,000 * 3e-6 * 900 = 10.80 > 9.60: rent.
    # Replica 2 carries 4,000: 10.80 > 9.60: rent. Replica 3 carries 2,000: 5.40 <= 9.60: not.
    case = rent_case(
        asked=3,
        overflow_tokens_per_s=10_000,
        endpoint=endpoint(),
        input_share=0.75,
        replica_tokens_per_s=4_000,
        usd_per_hour=28.8,
        episode_age_s=0,
        episodes_s=[],
        prior_episode_s=1_200,
        cold_start_s=300,
        billing_minimum_s=60,
    )
    assert case.rent == 2
    assert case.useful_life_s == pytest.approx(900)
    assert case.saved_usd == pytest.approx(10.80)
    assert case.rental_usd == pytest.approx(9.60)
    line = case.describe()
    assert "10.0k tok/s on hosted-eu" in line and "$10.80 > rental $9.60" in line
    assert "300s cold start" in line and line.endswith("renting 2")
    assert "\n" not in line


def test_a_short_episode_stays_on_the_managed_endpoint() -> None:
    # Same prices; episodes lasted 100, 200, 900 s and this one is 150 s old: R = 400 s,
    # L = 400 - 300 = 100 s. K = 0.008 * max(100 + 300, 60) = 3.20 USD.
    # S1 = 4,000 * 3e-6 * 100 = 1.20 <= 3.20: stay.
    case = rent_case(
        asked=2,
        overflow_tokens_per_s=10_000,
        endpoint=endpoint(),
        input_share=0.75,
        replica_tokens_per_s=4_000,
        usd_per_hour=28.8,
        episode_age_s=150,
        episodes_s=[100, 200, 900],
        prior_episode_s=1_200,
        cold_start_s=300,
        billing_minimum_s=60,
    )
    assert case.rent == 0
    assert case.saved_usd == pytest.approx(1.20) and case.rental_usd == pytest.approx(3.20)
    assert case.describe().endswith(
        "$1.20 <= rental $3.20 incl. 300s cold start; staying on hosted-eu"
    )


def test_an_episode_shorter_than_the_cold_start_never_rents() -> None:
    # R = 200 s < C = 300 s: L = 0, nothing saved whatever the overflow.
    case = rent_case(
        asked=4,
        overflow_tokens_per_s=1e6,
        endpoint=endpoint(),
        input_share=0.75,
        replica_tokens_per_s=4_000,
        usd_per_hour=1.0,
        episode_age_s=0,
        episodes_s=[200],
        prior_episode_s=1_200,
        cold_start_s=300,
        billing_minimum_s=0,
    )
    assert case.rent == 0 and case.useful_life_s == 0


def test_the_billing_minimum_counts() -> None:
    # No cold start; episodes of 30 s: R = 30 s, L = 30 s. S1 = 4,000 * 3e-6 * 30 = 0.36.
    # Minimum 60 s: K = 0.008 * max(30, 60) = 0.48 > 0.36: stay.
    # No minimum:   K = 0.008 * 30 = 0.24 < 0.36: rent.
    def case(minimum_s: float) -> int:
        return rent_case(
            asked=1,
            overflow_tokens_per_s=4_000,
            endpoint=endpoint(),
            input_share=0.75,
            replica_tokens_per_s=4_000,
            usd_per_hour=28.8,
            episode_age_s=0,
            episodes_s=[30],
            prior_episode_s=1_200,
            cold_start_s=0,
            billing_minimum_s=minimum_s,
        ).rent

    assert case(60) == 0
    assert case(0) == 1
    assert rental_usd(28.8, 30, 0, 60) == pytest.approx(0.48)


def test_release_when_the_traffic_is_cheaper_elsewhere() -> None:
    # q = 64 a replica, T = 6,400 tok/s: 100 tok/s a request; p = 3e-6; X = 1.5.
    # 8 in flight; reserved room 6 taken at 1/1.5: 4 to reserved, 4 to managed.
    # A = 4 * 100 * 3e-6 * 3,600 = 4.32 USD/h; B = 28.8 > 1.5 * 4.32 = 6.48: release.
    case = release_case(
        replica_id="r1",
        in_flight=8,
        keep_usd_per_hour=28.8,
        reserved_room=6,
        managed_room=64,
        replica_concurrency=64,
        replica_tokens_per_s=6_400,
        usd_per_token=3e-6,
        ratio=1.5,
    )
    assert case.cheaper
    assert case.to_reserved == pytest.approx(4) and case.to_managed == pytest.approx(4)
    assert case.managed_usd_per_hour == pytest.approx(4.32)
    assert case.describe() == (
        "r1 cheaper to release: $28.80/h > 1.5x $4.32/h for its 8 requests in flight: "
        "4 to free reserved room, 4 to managed at $4.32/h"
    )


def test_keep_when_the_managed_endpoint_would_cost_more() -> None:
    # 20 in flight, no reserved room: A = 20 * 100 * 3e-6 * 3,600 = 21.60 USD/h;
    # 1.5 * 21.60 = 32.40 >= 28.80: keep.
    case = release_case(
        replica_id="r1",
        in_flight=20,
        keep_usd_per_hour=28.8,
        reserved_room=0,
        managed_room=64,
        replica_concurrency=64,
        replica_tokens_per_s=6_400,
        usd_per_token=3e-6,
        ratio=1.5,
    )
    assert not case.cheaper and case.managed_usd_per_hour == pytest.approx(21.6)
    assert "worth keeping: $28.80/h <= 1.5x $21.60/h" in case.describe()
    # At ratio 1 (no hysteresis) the same replica would go: 28.80 > 21.60.
    assert release_case(
        replica_id="r1",
        in_flight=20,
        keep_usd_per_hour=28.8,
        reserved_room=0,
        managed_room=64,
        replica_concurrency=64,
        replica_tokens_per_s=6_400,
        usd_per_token=3e-6,
        ratio=1.0,
    ).cheaper


def test_keep_when_the_traffic_would_have_nowhere_to_go() -> None:
    def judge(reserved_room: float, managed_room: float, price: float | None) -> ReleaseCase:
        return release_case(
            replica_id="r1",
            in_flight=10,
            keep_usd_per_hour=28.8,
            reserved_room=reserved_room,
            managed_room=managed_room,
            replica_concurrency=64,
            replica_tokens_per_s=6_400,
            usd_per_token=price,
            ratio=1.5,
        )

    # No managed endpoint: 10 in flight, reserved room 30 (20 at 1/1.5): all 10 fit, A = 0.
    fits = judge(30, 0, None)
    assert fits.cheaper and fits.to_managed == 0
    # Reserved room 9 (6 usable): 4 would have nowhere to go.
    over = judge(9, 0, None)
    assert not over.cheaper and "no managed endpoint inside the lock" in over.blocked
    # A managed endpoint with room 3 (2 usable at 1/1.5) for 4 moved requests: keep.
    full = judge(9, 3, 3e-6)
    assert not full.cheaper and "room for 3" in full.describe()


def test_episodes_end_after_the_gap_and_the_history_is_bounded() -> None:
    e = track_episode(True, 100.0, None, None, [], gap_s=30)
    assert (e.started_at, e.seen_at, e.durations_s) == (100.0, 100.0, ())
    e = track_episode(False, 120.0, e.started_at, e.seen_at, e.durations_s, gap_s=30)
    assert e.started_at == 100.0  # a 20 s gap belongs to the episode
    e = track_episode(True, 125.0, e.started_at, e.seen_at, e.durations_s, gap_s=30)
    e = track_episode(False, 160.0, e.started_at, e.seen_at, e.durations_s, gap_s=30)
    # 35 s since the last sighting at 125: it ended there, lasting 25 s.
    assert (e.started_at, e.seen_at, e.durations_s) == (None, None, (25.0,))
    assert e.age_s(200.0) == 0.0
    history = [float(i) for i in range(EPISODES_KEPT + 5)]
    e = track_episode(False, 1000.0, 10.0, 20.0, history, gap_s=30)
    assert len(e.durations_s) == EPISODES_KEPT and e.durations_s[-1] == 10.0


def test_replicas_for() -> None:
    assert [replicas_for(x, 4000) for x in (0, 1, 4000, 4001, 12000)] == [0, 1, 1, 2, 3]


def test_what_the_replica_reports_carrying_prices_its_requests() -> None:
    # It reports 400 generated tok/s; at 75 % input that is 400 / 0.25 = 1,600 tok/s in all,
    # 200 a request of its 8. 4 move to managed: A = 4 * 200 * 3e-6 * 3,600 = 8.64 USD/h
    # (T / q would have said 100 a request: 4.32).
    carried = total_tokens_per_s(400, 0.75)
    assert carried == pytest.approx(1_600)
    case = release_case(
        replica_id="r1",
        in_flight=8,
        keep_usd_per_hour=28.8,
        reserved_room=6,
        managed_room=64,
        replica_concurrency=64,
        replica_tokens_per_s=6_400,
        usd_per_token=3e-6,
        ratio=1.5,
        carried_tokens_per_s=carried,
    )
    assert case.managed_usd_per_hour == pytest.approx(8.64)
    assert total_tokens_per_s(0, 0.75) is None and total_tokens_per_s(400, 1.0) is None
