"""The adaptive concurrency limit: hand-computed sequences, the policy's section, and bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from decisions.admission import AdaptiveLimit, AdmissionSettings, settings_for
from decisions.endpoints import Admission, GatewayRouting

S = AdmissionSettings(
    threshold_s=1.0,
    min_concurrency=2,
    initial_concurrency=10,
    backoff=0.5,
    backoff_interval_s=1.0,
    probe_interval_s=5.0,
    window_s=100.0,
)


def test_fast_samples_raise_the_limit_by_one_each_while_half_of_it_is_used() -> None:
    lim = AdaptiveLimit(S, 64, now=0.0)
    assert lim.limit == 10
    lim.sample(0.2, 0.1, in_flight=5)  # 5 * 2 >= 10: counts
    assert lim.limit == 11
    lim.sample(0.2, 0.2, in_flight=6)  # 12 >= 11
    assert lim.limit == 12
    lim.sample(0.2, 0.3, in_flight=5)  # 10 < 12: an underused replica says nothing
    assert lim.limit == 12
    assert lim.cap(0.4, in_flight=0) == 12


def test_a_slow_sample_cuts_from_the_requests_in_flight_once_per_interval() -> None:
    lim = AdaptiveLimit(S, 64, now=0.0)
    lim.sample(1.5, 1.0, in_flight=8)  # slow: 0.5 x min(10, 8) = 4
    assert lim.limit == 4
    lim.sample(1.5, 1.5, in_flight=8)  # within backoff_interval_s of the cut: ignored
    assert lim.limit == 4
    lim.sample(1.5, 2.0, in_flight=4)  # one interval later: 0.5 x 4 = 2
    assert lim.limit == 2
    lim.sample(3.0, 3.5, in_flight=2)  # 0.5 x 2 = 1, but never below min_concurrency
    assert lim.limit == 2
    assert lim.cap(3.6, in_flight=2) == 2


def test_the_threshold_itself_is_fast() -> None:
    lim = AdaptiveLimit(S, 64, now=0.0)
    lim.sample(1.0, 0.5, in_flight=10)
    assert lim.limit == 11


def test_the_limit_stays_under_the_static_cap() -> None:
    lim = AdaptiveLimit(S, 12, now=0.0)
    for i in range(10):
        lim.sample(0.1, 0.1 * i, in_flight=12)
    assert lim.limit == 12
    assert lim.cap(2.0, in_flight=3) == 12
    lim.set_max(6)
    assert lim.limit == 6
    # The initial value is clamped into the bounds too.
    assert AdaptiveLimit(S, 4, now=0.0).limit == 4
    assert AdaptiveLimit(S, 1, now=0.0).limit == 1  # a cap under min_concurrency wins


def test_a_request_waiting_past_the_threshold_counts_as_slow_before_its_first_token() -> None:
    lim = AdaptiveLimit(S, 64, now=0.0)
    assert lim.cap(0.5, in_flight=10, oldest_waiting_s=0.9) == 10  # not yet past 1.0 s
    assert lim.cap(1.2, in_flight=10, oldest_waiting_s=1.1) == 5  # 0.5 x 10
    assert lim.cap(1.3, in_flight=10, oldest_waiting_s=1.2) == 5  # one cut per interval
    assert lim.cap(2.3, in_flight=10, oldest_waiting_s=2.2) == 2  # 0.5 x min(5, 10) = 2.5


def test_a_full_replica_sent_nothing_for_a_while_takes_one_more_and_recovers() -> None:
    lim = AdaptiveLimit(S, 64, now=0.0)
    lim.sample(2.0, 1.0, in_flight=4)  # 0.5 x 4 = 2
    lim.sent(1.0)
    assert lim.cap(3.0, in_flight=2) == 2  # full, and sent something 2 s ago
    assert lim.cap(6.0, in_flight=2) == 3  # 5 s without a send: a probe
    lim.sent(6.0)
    assert lim.cap(6.1, in_flight=3) == 2  # the probe is one request, not a new limit
    lim.sample(0.3, 7.0, in_flight=3)  # the probe answered fast: 2 + 1
    lim.sample(0.3, 7.1, in_flight=3)
    assert lim.limit == 4
    assert lim.cap(7.2, in_flight=0) == 4


def test_a_limit_nobody_used_falls_to_twice_the_peak_each_window() -> None:
    windowed = AdaptiveLimit(
        AdmissionSettings(threshold_s=1.0, initial_concurrency=40, window_s=5.0), 128, now=0.0
    )
    assert windowed.cap(1.0, in_flight=3) == 40
    assert windowed.cap(4.0, in_flight=7) == 40  # the window's peak is 7
    assert windowed.cap(5.0, in_flight=1) == 14  # window over: 2 x 7
    assert windowed.cap(10.0, in_flight=10) == 14  # 2 x 10 >= 14: kept
    assert windowed.cap(15.0, in_flight=0) == 14  # peak 10 in that window: 20 >= 14
    assert windowed.cap(20.0, in_flight=0) == 2  # nothing in flight: min_concurrency


def test_settings_from_the_policy() -> None:
    routing = GatewayRouting()
    s = settings_for(routing.admission, 2.0)
    assert s is not None
    assert s.threshold_s == pytest.approx(0.75 * 2.0)
    assert (s.min_concurrency, s.initial_concurrency, s.backoff) == (2, 16, 0.9)
    assert settings_for(Admission(adaptive=False), 2.0) is None
    custom = Admission(target_share=0.5, min_concurrency=4, initial_concurrency=8, window_s=3)
    s = settings_for(custom, 1.0)
    assert s is not None
    assert (s.threshold_s, s.min_concurrency, s.initial_concurrency, s.window_s) == (
        0.5,
        4,
        8,
        3.0,
    )


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"admission": {"target_share": 0}}, "target_share"),
        ({"admission": {"target_share": 1.5}}, "target_share"),
        ({"admission": {"backoff": 1.0}}, "backoff"),
        ({"admission": {"min_concurrency": 0}}, "min_concurrency"),
        ({"admission": {"adaptive": "yes"}}, "adaptive"),
        ({"admission": {"aimd": True}}, "aimd"),
        (
            {"admission": {"min_concurrency": 8, "initial_concurrency": 4}},
            "initial_concurrency (4) must be at least min_concurrency (8)",
        ),
        (
            {"max_concurrency_per_replica": 4, "admission": {"min_concurrency": 8}},
            "admission.min_concurrency (8) must not exceed max_concurrency_per_replica (4)",
        ),
    ],
)
def test_bad_admission_sections_say_what_is_wrong(section: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        GatewayRouting.model_validate(section)
    assert words in str(caught.value)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold_s"):
        AdmissionSettings(threshold_s=0.0)
    with pytest.raises(ValueError, match="backoff"):
        AdmissionSettings(threshold_s=1.0, backoff=1.0)
    with pytest.raises(ValueError, match="min_concurrency"):
        AdmissionSettings(threshold_s=1.0, min_concurrency=0)


events = st.lists(
    st.tuples(
        st.sampled_from(["sample", "cap", "sent"]),
        st.floats(0.0, 5.0),  # time step
        st.floats(0.0, 10.0),  # TTFT or the oldest wait
        st.integers(0, 300),  # in flight
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    events=events,
    cap=st.integers(1, 256),
    low=st.integers(1, 16),
    initial=st.integers(1, 300),
    backoff=st.floats(0.05, 0.95),
    window=st.floats(0.1, 20.0),
)
def test_the_limit_always_stays_within_its_bounds(
    events: list[tuple[str, float, float, int]],
    cap: int,
    low: int,
    initial: int,
    backoff: float,
    window: float,
) -> None:
    s = AdmissionSettings(
        threshold_s=1.0,
        min_concurrency=low,
        initial_concurrency=max(low, initial),
        backoff=backoff,
        window_s=window,
    )
    lim = AdaptiveLimit(s, cap, now=0.0)
    floor = min(low, cap)
    now = 0.0
    for kind, step, seconds, in_flight in events:
        now += step
        if kind == "sample":
            lim.sample(seconds, now, in_flight)
        elif kind == "sent":
            lim.sent(now)
        else:
            got = lim.cap(now, in_flight, seconds)
            assert 1 <= got <= cap
            assert got <= max(int(lim.limit), min(cap, in_flight + 1))
        assert floor <= lim.limit <= cap
