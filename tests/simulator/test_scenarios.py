"""The gateway in the simulator, the scenarios, the baselines' searches and the hindsight bound."""

from __future__ import annotations

import itertools
import math
from array import array
from typing import Any

import pytest

import decisions.planning as planning
import decisions.routing as routing
import simulator.controllers as controllers
import simulator.gateway as gateway
from decisions.fleetview import FleetSnapshot
from simulator import Trace, simulate
from simulator.cluster import MANAGED, REJECTED, TooManyMisses
from simulator.scenarios import SCENARIOS, SLO_SHARE, prepare, run_scenario
from simulator.searches import on_demand_target, peak_reservation, target_scale
from simulator.summary import slo_attainment
from tests.simulator.conftest import bursty_trace, policy, settings, with_gateway, with_managed


def test_every_routing_attempt_is_a_call_of_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request is routed by decisions.routing.route on arrival, and again on every pass
    of the queue while it waits; where it went is what route() said."""
    decisions: list[routing.Decision] = []

    def counting(*args: Any, **kwargs: Any) -> routing.Decision:
        decision = routing.route(*args, **kwargs)
        decisions.append(decision)
        return decision

    monkeypatch.setattr(gateway, "route", counting)
    p = with_gateway(with_managed(policy(), max_concurrency=4), max_concurrency_per_replica=8)
    trace = bursty_trace(minutes=10, busy=6.0)
    sim = simulate(p, trace, settings(), scenarios=("policy",))
    c = sim.results["policy"].cluster
    s = sim.summaries["policy"]
    assert len(decisions) == c.gateway.route_calls == s["gateway"]["route_calls"]
    assert len(decisions) > len(trace)  # some waited and were routed again
    routed = [d for d in decisions if isinstance(d, routing.Routed)]
    queued = [d for d in decisions if isinstance(d, routing.Queued)]
    assert queued and len(queued) >= s["gateway"]["queued"]
    to_managed = sum(1 for d in routed if d.target.tier is routing.Tier.MANAGED)
    assert to_managed == s["served_on_managed"] > 0
    refused_by_replicas = s["rejections"].get("longer than the context length", 0)
    assert len(routed) - to_managed == s["served_on_reserved"] + s["served_on_rented"] + (
        refused_by_replicas
    )
    # Every request routed once at least; the timed-out ones never got a target.
    timed_out = s["gateway"]["queue_timeouts"] + s["gateway"]["queue_full"]
    assert len(routed) + timed_out == len(trace)


def test_the_gateway_reports_its_queue_and_overflow_into_the_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[float, FleetSnapshot]] = []
    real = planning.plan_step

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append((args[4], args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(controllers, "plan_step", recording)
    p = with_gateway(with_managed(policy(), max_concurrency=4), max_concurrency_per_replica=8)
    sim = simulate(p, bursty_trace(minutes=10, busy=6.0), settings(), scenarios=("policy",))
    loads = [(at, snap.gateway["chat"]) for at, snap in seen]
    assert all(load.gateways == 1 for _, load in loads)
    assert any(load.queue_depth > 0 and load.oldest_queued_s > 0 for _, load in loads)
    assert all(load.oldest_queued_s == 0 for _, load in loads if load.queue_depth == 0)
    # Overflow tokens/s integrated over the reports is every token sent to the endpoint
    # before the last report.
    g = sim.results["policy"].cluster.gateway
    last = loads[-1][0]
    sent = sum(tokens for at, _, tokens in g.spend if at < last)
    integral = loads[0][1].overflow_tokens_per_s * loads[0][0]
    for (before, _), (at, load) in itertools.pairwise(loads):
        integral += load.overflow_tokens_per_s * (at - before)
    assert sent > 0
    assert integral == pytest.approx(sent, rel=1e-9)


def test_the_bounded_queue_refuses_when_full_and_after_its_timeout() -> None:
    """One reserved replica held to 2 in flight, a queue of 3 that waits 1 s: a burst of 20
    requests at once is 2 served, 3 waiting (served or timed out), 15 refused as full."""
    p = with_gateway(
        policy(enabled=False), max_concurrency_per_replica=2, queue_size=3, queue_timeout_s=1
    )
    rows = array("d", [10.0] * 20)
    trace = Trace(rows, array("l", [4000] * 20), array("l", [400] * 20), 120)
    st = settings(reserved={"machines": 1})
    sim = simulate(p, trace, st, scenarios=("reserved-only",))
    s = sim.summaries["reserved-only"]
    assert s["gateway"]["queue_full"] == 15
    assert s["rejections"]["the gateway queue was full (429)"] == 15
    timed_out = s["rejections"].get("waited 1s in the gateway queue (503)", 0)
    assert s["gateway"]["queue_timeouts"] == timed_out == 3  # 400 tokens take longer than 1 s
    assert s["served"] == 2
    assert slo_attainment(sim.results["reserved-only"].cluster, st.ttft_slo_s) <= 2 / 20


def test_a_managed_endpoint_answers_as_modelled_and_bills_its_tokens() -> None:
    p = with_managed(policy(), added_latency_s=0.4, max_concurrency=8)
    gaps = [(float(i * 5), 1000 + i, 50 + i) for i in range(40)]
    trace = Trace.of(gaps, duration_s=300)
    st = settings(managed_output_tokens_per_s=50)
    sim = simulate(p, trace, st, scenarios=("managed-only",))
    c = sim.results["managed-only"].cluster
    prof = sim.setup.profile
    for i in range(len(trace)):
        first = prof.prefill_step_s + trace.input_tokens[i] / prof.prefill_tokens_per_s + 0.4
        assert c.outcome[i] == MANAGED
        assert c.ttft[i] == pytest.approx(first)
        assert c.e2e[i] == pytest.approx(first + (trace.output_tokens[i] - 1) / 50)
    s = sim.summaries["managed-only"]
    tokens = sum(trace.input_tokens) + sum(trace.output_tokens)
    assert s["cost_usd"]["managed"] == pytest.approx(tokens * 0.18 / 1e6)
    assert s["cost_usd"]["total"] == s["cost_usd"]["overflow"] == s["cost_usd"]["managed"]
    assert not s["uses_reserved"] and s["reserved_gpus"] == 0


def test_a_run_stops_once_its_misses_are_too_many() -> None:
    trace = bursty_trace(minutes=20, busy=8.0)
    p = policy(enabled=False)
    setup = prepare(p, trace, settings(reserved={"machines": 1}))
    with pytest.raises(TooManyMisses):
        run_scenario("reserved-only", setup, trace, settings(), stop_after_misses=10)
    full = run_scenario("reserved-only", setup, trace, settings())
    assert full.cluster.misses > 10
    assert sum(1 for o in full.cluster.outcome if o == REJECTED) <= full.cluster.misses


def test_the_peak_reservation_is_the_smallest_that_holds() -> None:
    """Against a brute-force sweep of every reservation from one machine up."""
    trace = bursty_trace(minutes=12, busy=5.0)
    st = settings(reserved={"machines": 1})
    setup = prepare(policy(), trace, st)
    found = peak_reservation(setup, trace, st)
    assert found.holds
    sweep = {}
    for machines in range(1, int(found.value) + 2):
        r = run_scenario("reserved-for-peak", setup, trace, st, reserved_machines=machines)
        sweep[machines] = slo_attainment(r.cluster, st.ttft_slo_s) >= SLO_SHARE
    assert min(m for m, held in sweep.items() if held) == found.value
    assert found.result is not None
    assert slo_attainment(found.result.cluster, st.ttft_slo_s) >= SLO_SHARE
    assert found.result.parameters["reserved_machines"] == found.value
    # Fewer runs than the sweep: candidates that miss stop early.
    assert any(attainment is None for _, held, attainment in found.tried if not held)


def test_the_on_demand_target_is_the_highest_on_the_scale_that_holds() -> None:
    """Against a brute-force sweep of every target on the scale."""
    trace = bursty_trace(minutes=15, busy=4.0)
    st = settings(
        on_demand={
            "tune": True,
            "search_points": 9,
            "upscale_delay_s": 60,
            "downscale_delay_s": 300,
        }
    )
    setup = prepare(policy(), trace, st)
    found = on_demand_target(setup, trace, st)
    scale = target_scale(setup, st)
    held = []
    for target in scale:
        r = run_scenario("on-demand", setup, trace, st, target_qps=target)
        held.append(slo_attainment(r.cluster, st.ttft_slo_s) >= SLO_SHARE)
    assert any(held) and not all(held)  # else the case tests nothing
    first_miss = held.index(False)
    assert all(held[:first_miss]) and not any(held[first_miss:])  # monotone: bisection's premise
    assert found.holds and found.value == scale[first_miss - 1]
    assert "the highest of 9" in found.note


def test_the_on_demand_search_says_when_no_target_holds() -> None:
    """Machines that take an hour to boot: no target can follow the burst."""
    slow = {c: {"boot_s": 3600, "capacity_error_probability": 0} for c in ("aws", "gcp", "azure")}
    trace = bursty_trace(minutes=10, busy=8.0)
    st = settings(
        clouds=slow, on_demand={"tune": True, "search_points": 5, "target_range": (1.0, 4.0)}
    )
    setup = prepare(policy(), trace, st)
    found = on_demand_target(setup, trace, st)
    assert not found.holds
    assert found.value == target_scale(setup, st)[0]
    assert "no target from" in found.note
    sim = simulate(policy(), trace, st, scenarios=("on-demand",))
    assert sim.summaries["on-demand"]["slo_attainment"] < SLO_SHARE
    assert any("no target from" in n for n in sim.setup.notes)


def test_the_hindsight_bound_is_at_most_what_any_holding_scenario_spends() -> None:
    p = with_gateway(with_managed(policy(), max_concurrency=64), max_concurrency_per_replica=8)
    trace = bursty_trace(minutes=20, busy=8.0)
    st = settings(on_demand={"tune": True, "search_points": 5})
    sim = simulate(p, trace, st)
    bound = sim.summaries["hindsight-bound"]
    assert bound["computed"] and "dynamic programming" in bound["how"]
    assert bound["slo_attainment"] >= SLO_SHARE
    assert bound["cost_usd"]["overflow"] > 0
    same_reservation = [
        n
        for n, s in sim.summaries.items()
        if s["uses_reserved"]
        and n != "hindsight-bound"
        and s["reserved_gpus"] == bound["reserved_gpus"]
        and s["slo_attainment"] >= SLO_SHARE
    ]
    assert "policy" in same_reservation
    for name in same_reservation:
        assert bound["cost_usd"]["overflow"] <= sim.summaries[name]["cost_usd"]["overflow"], name


def test_the_json_names_every_scenario_with_its_figures() -> None:
    p = with_managed(policy())
    trace = bursty_trace(minutes=10)
    st = settings(on_demand={"tune": True, "search_points": 5})
    data = simulate(p, trace, st).data()
    assert list(data["scenarios"]) == list(SCENARIOS)
    for name, s in data["scenarios"].items():
        assert isinstance(s["uses_reserved"], bool), name
        assert 0 <= s["slo_attainment"] <= 1, name
        cost = s["cost_usd"]
        assert cost["total"] == pytest.approx(cost["reserved"] + cost["overflow"]), name
        assert cost["overflow"] == pytest.approx(cost["rented"] + cost["managed"]), name
    uses = {n for n, s in data["scenarios"].items() if s["uses_reserved"]}
    assert uses == {"reserved-only", "reserved-for-peak", "rent-only", "policy", "hindsight-bound"}
    assert data["tuning"]["tuned_on_scored_data"] is True
    assert any("tuned on the scored data" in n for n in data["notes"])
    assert set(data["searches"]) == {"reserved-for-peak", "on-demand"}
    ranking = data["comparison"]["ranking"]
    assert ranking["reserved_discount"] == pytest.approx(0.4)
    for key in ("at_reserved_discount", "at_no_discount"):
        rows = ranking[key]
        assert {r["scenario"] for r in rows} == set(SCENARIOS) - {"hindsight-bound"}
        held = [r["holds_slo"] for r in rows]
        assert held == sorted(held, reverse=True)  # holding ones first
    at_zero = {r["scenario"]: r["total_usd"] for r in ranking["at_no_discount"]}
    at_discount = {r["scenario"]: r["total_usd"] for r in ranking["at_reserved_discount"]}
    assert at_zero["on-demand"] == pytest.approx(at_discount["on-demand"])
    assert at_zero["policy"] > at_discount["policy"]
    assert data["comparison"]["policy_overflow_vs_hindsight_bound"] is None or (
        data["comparison"]["policy_overflow_vs_hindsight_bound"] >= 0
    )


def test_tuning_on_other_data_is_used_and_said() -> None:
    """Tuned on a quiet trace, the peak reservation is smaller than the scored burst needs."""
    scored = bursty_trace(minutes=12, busy=6.0)
    quiet = bursty_trace(seed=2, minutes=12, busy=1.5)
    st = settings(reserved={"machines": 1})
    played = ("reserved-only", "reserved-for-peak")
    own = simulate(policy(), scored, st, scenarios=played)
    other = simulate(policy(), scored, st, scenarios=played, tune_on=quiet, tune_label="quiet")
    assert other.tuning == {
        "on": "quiet",
        "tuned_on_scored_data": False,
        "requests": len(quiet),
        "duration_s": quiet.duration_s,
    }
    assert any("tuned on quiet, then scored here" in n for n in other.setup.notes)
    assert other.searches["reserved-for-peak"].value < own.searches["reserved-for-peak"].value
    r = other.results["reserved-for-peak"]
    assert r.cluster.trace is scored
    assert r.parameters["reserved_machines"] == other.searches["reserved-for-peak"].value
    assert other.summaries["reserved-for-peak"]["slo_attainment"] < SLO_SHARE
    assert math.isclose(own.summaries["reserved-for-peak"]["slo_attainment"], 1.0) or (
        own.summaries["reserved-for-peak"]["slo_attainment"] >= SLO_SHARE
    )


def _two_bursts() -> Trace:
    """Busy for 5 minutes, quiet for 15, busy for 5 again, then quiet."""
    first = bursty_trace(seed=4, minutes=15, quiet=0.5, busy=6.0)
    rows = [
        (first.arrivals[i], first.input_tokens[i], first.output_tokens[i])
        for i in range(len(first))
    ]
    rows += [(t + 1200.0, a, b) for t, a, b in rows]
    return Trace.of(rows, duration_s=2700)


@pytest.mark.parametrize("release", ["terminate", "stop"])
def test_a_warm_pool_restarts_a_stopped_machine_without_downloading(release: str) -> None:
    p = policy(release=release, max_spilled_replicas=1, cool_down_s=60)
    st = settings(reserved={"machines": 1}, weights_gb=60, disk_usd_per_gb_month=30.0)
    sim = simulate(p, _two_bursts(), st, scenarios=("rent-only",))
    c = sim.results["rent-only"].cluster
    kinds = [e.kind for e in c.events]
    launches = [e for e in c.events if e.kind in ("launch", "restart")]
    assert len(launches) >= 2
    boot = st.cloud(
        c.machines[f"{launches[0].text.split()[0]}-{launches[0].replica_id}"].provider
    ).boot_s
    download = 60e9 / (st.prefetch_mb_per_s * 1e6)
    ready = {e.replica_id: e.at for e in c.events if e.kind == "healthy"}
    if release == "stop":
        assert "stopped" in kinds and "restart" in kinds
        restart = next(e for e in c.events if e.kind == "restart")
        # Boot and replica start, no download.
        assert ready[restart.replica_id] - restart.at == pytest.approx(
            st.launch_call_s + boot + st.replica_start_s
        )
        assert c.warm_pool is not None and c.warm_pool.restarts >= 1
        disk = c.warm_pool.disk_usd(c.horizon)
        assert disk > 0
        assert sim.summaries["rent-only"]["cost_usd"]["rented"] == pytest.approx(
            disk + _compute_cost(sim)
        )
    else:
        assert "stopped" not in kinds and "restart" not in kinds
        second = launches[1]
        assert ready[second.replica_id] - second.at == pytest.approx(
            boot + download + st.replica_start_s
        )
        assert c.warm_pool is None


def _compute_cost(sim: Any) -> float:
    from simulator.scenarios import rented_cost

    return rented_cost(sim.results["rent-only"].cluster, sim.settings)


def test_on_off_bursts_from_the_bench_generator_overflow_to_the_managed_endpoint() -> None:
    """Bursts at over 20x the mean per 10 s, too short for any rental: reserved-only misses
    them, the policy holds them on the managed endpoint, near the hindsight bound's spend."""
    from bench.bursty_trace import generate, peak_to_mean

    rows = generate(1200.0, 1.0, seed=3)
    trace = Trace.of(rows, duration_s=1200.0)
    assert peak_to_mean(trace.arrivals, trace.duration_s) > 20
    p = with_gateway(with_managed(policy(), max_concurrency=128), max_concurrency_per_replica=2)
    st = settings(reserved={"machines": 1})
    played = ("reserved-only", "policy", "hindsight-bound")
    sim = simulate(p, trace, st, scenarios=played)
    s = sim.summaries
    assert s["reserved-only"]["slo_attainment"] < SLO_SHARE <= s["policy"]["slo_attainment"]
    assert s["policy"]["served_on_managed"] > 0
    bound = s["hindsight-bound"]["cost_usd"]["overflow"]
    assert 0 < bound <= s["policy"]["cost_usd"]["overflow"] < 1.25 * bound
