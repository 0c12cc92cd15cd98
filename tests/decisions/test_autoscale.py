"""Autoscaling decisions: windows, hysteresis, bounded steps, bounds."""

from __future__ import annotations

import pytest

from decisions.autoscale import Sample, decide, fast_signal, signal
from decisions.fleetview import FleetSnapshot, GatewayLoad, ReplicaState, ReplicaView
from decisions.policy import Deployment

DEP = Deployment.model_validate(
    {
        "model": "m",
        "weights": "s3://b/m",
        "sku": "H100-80GB",
        "gpus": 8,
        "pools": ["p"],
        "min_replicas": 1,
        "max_replicas": 5,
        "autoscaling": {"target": 4, "scale_down_below": 1, "max_step_up": 2},
        "spillover": {"scale_up_window_s": 60, "cool_down_s": 300},
    }
)


def flat(value: float, start: float, end: float) -> list[Sample]:
    return [Sample(float(t), value) for t in range(int(start), int(end) + 1, 10)]


@pytest.mark.parametrize(
    ("samples", "current", "last", "desired"),
    [
        (flat(10, 0, 100), 2, None, 4),  # sustained: +2, bounded by max_step_up
        (flat(10, 60, 100), 2, None, 2),  # saturated only 40 s of the 60 s window
        (flat(10, 0, 100), 2, 70.0, 2),  # changed 30 s ago: wait a whole window
        (flat(2, 0, 400), 3, None, 3),  # inside the hysteresis band
        (flat(0.5, 0, 400), 3, None, 2),  # quiet for the cool-down: -1
        (flat(0.5, 200, 400), 3, None, 3),  # quiet, but not for the whole cool-down
        (flat(0.5, 0, 400), 1, None, 1),  # never below min
        (flat(10, 0, 100), 5, None, 5),  # never above max
        ([], 0, None, 1),  # below min: raised
    ],
)
def test_decisions(samples: list[Sample], current: int, last: float | None, desired: int) -> None:
    now = samples[-1].at if samples else 0.0
    decision = decide("chat", DEP, current, samples, now, last)
    assert decision.desired == desired, decision.reason
    assert decision.reason


def test_samples_a_window_apart_need_the_opening_one_saturated_too() -> None:
    """Samples as far apart as the window: the one at the window's start is what shows the
    signal already held then; a single saturated sample after a calm one is not a window."""
    calm_then_busy = [Sample(39.5, 1.0), Sample(100.0, 10.0)]
    assert decide("d", DEP, 2, calm_then_busy, now=100.0).desired == 2
    busy_twice = [Sample(39.5, 10.0), Sample(100.0, 10.0)]
    assert decide("d", DEP, 2, busy_twice, now=100.0).desired == 4


def _with_signal(kind: str, min_replicas: int = 0) -> Deployment:
    scaling = DEP.autoscaling.model_copy(update={"signal": kind})
    return DEP.model_copy(update={"autoscaling": scaling, "min_replicas": min_replicas})


def test_gateway_signals_are_totals_and_have_a_value_without_any_replica() -> None:
    replicas = (
        ReplicaView("r0", "chat", "a", ReplicaState.HEALTHY, queued_requests=6),
        ReplicaView("r1", "chat", "a", ReplicaState.STARTING, queued_requests=2),
    )
    loads = {"chat": GatewayLoad(queue_depth=9, overflow_tokens_per_s=250.0, gateways=3)}
    empty = FleetSnapshot((), ())
    assert signal("chat", _with_signal("queued_at_gateway"), empty) == 0.0
    assert signal("chat", _with_signal("overflow_tokens_per_s"), empty) == 0.0
    assert signal("chat", _with_signal("queued_per_replica"), empty) is None
    snap = FleetSnapshot((), replicas, loads)
    assert signal("chat", _with_signal("queued_at_gateway"), snap) == 9.0  # not per replica
    assert signal("chat", _with_signal("overflow_tokens_per_s"), snap) == 250.0
    assert signal("chat", _with_signal("queued_per_replica"), snap) == 6.0  # gateways ignored
    assert signal("other", _with_signal("queued_at_gateway"), snap) == 0.0


def test_scale_up_from_zero_replicas() -> None:
    dep = _with_signal("queued_at_gateway")
    decision = decide("chat", dep, 0, flat(10, 0, 100), 100.0)
    assert decision.desired == 2, decision.reason  # ceil(10 / 4) = 3, at most 2 a step
    assert decide("chat", dep, 0, flat(0, 0, 400), 400.0).desired == 0  # quiet: stays at zero


def _slo(dep: Deployment, cap: int | None = None) -> Deployment:
    gateway = dep.gateway.model_copy(update={"max_concurrency_per_replica": cap})
    slo = dep.slo.model_copy(update={"ttft_s": 2.0, "saturated_queue_age": 0.25})
    return dep.model_copy(update={"slo": slo, "gateway": gateway})


def test_a_queue_older_than_its_share_of_the_ttft_target_is_saturation_now() -> None:
    # 0.25 x 2 s = 0.5 s: 0.6 s is over it, 0.4 s is not.
    dep = _slo(DEP)
    healthy = (ReplicaView("r0", "chat", "a", ReplicaState.HEALTHY),)
    old = FleetSnapshot((), healthy, {"chat": GatewayLoad(queue_depth=3, oldest_queued_s=0.6)})
    young = FleetSnapshot((), healthy, {"chat": GatewayLoad(queue_depth=3, oldest_queued_s=0.4)})
    fast = fast_signal("chat", dep, old)
    assert fast.saturated == (
        "3 queued at the gateways, the oldest for 0.60s > 0.50s (0.25 x 2s TTFT)"
    )
    assert fast.wanted == 1
    assert fast_signal("chat", dep, young).saturated == ""
    assert fast_signal("chat", dep, FleetSnapshot((), healthy)).saturated == ""


def test_a_queue_with_no_room_anywhere_is_saturation_however_young() -> None:
    dep = _slo(DEP, cap=8)
    queued = GatewayLoad(queue_depth=20, oldest_queued_s=0.01, in_flight={"r0": 8, "r1": 8})
    full = (
        ReplicaView("r0", "chat", "a", ReplicaState.HEALTHY),
        ReplicaView("r1", "chat", "a", ReplicaState.HEALTHY),
    )
    fast = fast_signal("chat", dep, FleetSnapshot((), full, {"chat": queued}))
    assert fast.saturated == "20 queued at the gateways and every replica at its 8 in flight"
    assert fast.wanted == 3  # ceil(20 / 8)
    room = GatewayLoad(queue_depth=20, oldest_queued_s=0.01, in_flight={"r0": 8, "r1": 7})
    assert fast_signal("chat", dep, FleetSnapshot((), full, {"chat": room})).saturated == ""
    # Without a cap known, only the age says so.
    assert fast_signal("chat", _slo(DEP), FleetSnapshot((), full, {"chat": queued})).saturated == ""
    none = fast_signal("chat", _slo(DEP), FleetSnapshot((), (), {"chat": queued}))
    assert none.saturated == "20 queued at the gateways and no healthy replica"
