"""The simulator: nothing lost, costs add up, locks hold, seeds repeat, decisions are Spillway's."""

from __future__ import annotations

import math
from array import array
from pathlib import Path
from typing import Any

import pytest

import decisions.planning as planning
import simulator.controllers as controllers
from agent.runtimes.simulated_model import PROFILES
from common.configfile import ConfigError
from decisions.policy import Credentials
from providers.catalog import OfferRequest, default_catalog
from simulator import SimSettings, Trace, simulate
from simulator.cluster import OWNED, Cluster, Machine
from simulator.scenarios import billed_seconds, rented_cost, spill_episodes
from simulator.settings import load_settings
from tests.simulator.conftest import bursty_trace, policy, settings, with_gateway, with_managed


def without_wall_times(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: without_wall_times(v) for k, v in data.items() if k != "wall_s"}
    if isinstance(data, list):
        return [without_wall_times(v) for v in data]
    return data


def test_every_request_is_served_or_rejected_and_none_is_lost() -> None:
    trace = bursty_trace()
    rows = [
        (trace.arrivals[i], trace.input_tokens[i], trace.output_tokens[i])
        for i in range(len(trace))
    ]
    # Three requests no replica can hold (longer than the context), one with nothing to generate.
    rows += [(100.0, 40_000, 10), (700.0, 30_000, 5_000), (1500.0, 100, 0)]
    trace = Trace.of(rows, duration_s=trace.duration_s)
    played = ("reserved-only", "rent-only", "policy", "on-demand", "managed-only")
    # Replicas count as full at 16 in flight, so that the burst overflows to the endpoint.
    p = with_gateway(with_managed(policy()), max_concurrency_per_replica=16)
    sim = simulate(p, trace, settings(), scenarios=played)
    for name, s in sim.summaries.items():
        assert s["requests"] == len(trace), name
        assert s["served"] + s["rejected"] == len(trace), name
        assert s["lost"] == 0, name
        rejections = dict(s["rejections"])
        if name in ("policy", "managed-only"):  # the endpoint absorbs the burst: no waiting
            assert rejections.pop("no prompt or nothing to generate") == 1, name
            # The replica model refuses the long ones; the managed endpoint takes them when
            # the replicas are full (or always, when there are none).
            long = [i for i in range(len(trace)) if trace.input_tokens[i] >= 30_000]
            c = sim.results[name].cluster
            refused = [i for i in long if c.outcome[i] == 2]
            assert all(c.outcome[i] in (2, 3) for i in long)
            assert rejections.pop("longer than the context length", 0) == len(refused)
            assert name != "managed-only" or not refused
        rejections.pop("no prompt or nothing to generate", None)
        rejections.pop("longer than the context length", None)
        # Anything else is the gateway's own refusal: its queue full, or waited too long.
        assert all("gateway queue" in reason for reason in rejections), (name, rejections)
        assert s["rejected"] == sum(s["rejections"].values())
        assert (
            s["served_on_reserved"] + s["served_on_rented"] + s["served_on_managed"] == s["served"]
        )
        c = sim.results[name].cluster
        for i in range(len(trace)):
            if c.outcome[i] in (0, 1, 3):
                assert 0 < c.ttft[i] <= c.e2e[i], (name, i)
    assert sim.summaries["on-demand"]["served_on_reserved"] == 0
    assert sim.summaries["reserved-only"]["served_on_rented"] == 0
    assert sim.summaries["policy"]["served_on_managed"] > 0  # the burst overflowed
    assert sim.summaries["managed-only"]["served_on_managed"] == len(trace) - 1


def test_requests_arriving_with_no_replica_wait_for_one() -> None:
    """On demand with min_replicas 0 and a silent first minute: nothing runs when the first
    request comes; it waits in the gateway queue for a machine to boot, and is served, not
    dropped, when the queue's timeout allows that long; with the default 30 s it is refused."""
    p = policy()
    dep = p.deployments["chat"].model_copy(update={"min_replicas": 0})
    p = p.model_copy(update={"deployments": {"chat": dep}})
    one = Trace(array("d", [120.0]), array("l", [500]), array("l", [50]), 600)
    short = simulate(p, one, settings(), scenarios=("on-demand",))
    assert short.summaries["on-demand"]["rejections"] == {
        "waited 30s in the gateway queue (503)": 1
    }
    p = with_gateway(p, queue_timeout_s=3600)
    trace = Trace(
        array("d", (120.0 + i for i in range(20))),
        array("l", [500] * 20),
        array("l", [50] * 20),
        1200,
    )
    sim = simulate(p, trace, settings(), scenarios=("on-demand",))
    s = sim.summaries["on-demand"]
    assert (s["served"], s["rejected"], s["lost"]) == (20, 0, 0)
    boot = settings().cloud("aws").boot_s
    assert s["ttft_s"]["p50"] > boot  # it waited for a machine


def test_billing_rounds_as_each_cloud_bills() -> None:
    s = SimSettings()
    assert billed_seconds(s, "aws", 61.2, ended=True) == 62  # per second
    assert billed_seconds(s, "aws", 30, ended=True) == 60  # one-minute minimum
    assert billed_seconds(s, "azure", 61, ended=True) == 120  # per started minute
    assert billed_seconds(s, "gcp", 61.2, ended=False) == 61.2  # still running: no rounding


def test_rented_cost_against_a_hand_computed_bill() -> None:
    cluster = Cluster("chat", Trace.of([], duration_s=3600), PROFILES["L40S"], SimSettings())
    for machine in (
        Machine("a", "aws", "us-east-1", "us", "spill", 1, 10.0, launched_at=0, terminated_at=1800),
        Machine("b", "azure", "eastus", "us", "spill", 1, 6.0, launched_at=100, terminated_at=130),
        Machine("c", "gcp", "us-east4", "us", "spill", 1, 3.6, launched_at=3000),
        Machine("d", "aws", "us-east-1", "us", "spill", 1, 99.0, launched_at=3600),  # after the end
        Machine("r", OWNED, "vpc", "us", "reserved-a", 8, 0.0),
    ):
        cluster.add_machine(machine)
    # a: half an hour at $10; b: 30 s billed as a minute at $6/h; c: 600 s still running at $3.6/h
    assert rented_cost(cluster, SimSettings()) == pytest.approx(5.0 + 0.1 + 0.6)
    episodes = spill_episodes(cluster)
    assert [(e.start, e.end) for e in episodes] == [(0, 1800), (3000, 3600)]


def test_reserved_cost_is_gpus_times_hours_times_the_committed_price() -> None:
    trace = Trace.of([(float(i), 300, 30) for i in range(0, 3600, 10)], duration_s=7200)
    st = settings(reserved={"machines": 3, "gpus_per_machine": 2, "usd_per_gpu_hour": 1.25})
    sim = simulate(policy(enabled=False, providers=[]), trace, st, scenarios=("reserved-only",))
    s = sim.summaries["reserved-only"]
    assert s["cost_usd"] == {
        "reserved": 3 * 2 * 2 * 1.25,
        "rented": 0.0,
        "managed": 0.0,
        "overflow": 0.0,
        "total": 15.0,
    }
    assert s["usd_per_million_output_tokens"] == pytest.approx(15.0 / (360 * 30) * 1e6)


def test_the_committed_price_is_the_cheapest_offer_in_the_lock_less_the_discount() -> None:
    catalog = default_catalog()
    offers = catalog.offers(OfferRequest("L40S", 1))
    cheapest_eu = next(o for o in offers if o.residency == "eu").usd_per_gpu_hour
    sim = simulate(
        policy(residency="eu"),
        Trace.of([(1.0, 100, 10)], duration_s=60),
        settings(reserved={"machines": 1, "discount": 0.25}),
        scenarios=("reserved-only",),
    )
    assert sim.setup.on_demand_usd_per_gpu_hour == cheapest_eu
    assert sim.setup.reserved_usd_per_gpu_hour == pytest.approx(cheapest_eu * 0.75)


def test_a_locked_deployment_never_runs_outside_its_residency_group() -> None:
    catalog = default_catalog()
    cheapest = catalog.offers(OfferRequest("L40S", 1))[0]
    assert cheapest.residency != "eu"  # else the lock would not be tested
    # Capacity errors half the time: provisions walk to other offers, all inside the lock.
    clouds = {c: {"boot_s": 60, "capacity_error_probability": 0.5} for c in ("aws", "gcp", "azure")}
    sim = simulate(
        policy(residency="eu"),
        bursty_trace(busy=6.0),
        settings(clouds=clouds),
        scenarios=("policy", "on-demand"),
    )
    residency: dict[tuple[str, str], str] = {
        (c.cloud, r.name): r.residency for c in catalog.clouds.values() for r in c.regions.values()
    }
    assert sum(s["events"].get("capacity_error", 0) for s in sim.summaries.values()) > 0
    for name in ("policy", "on-demand"):
        s = sim.summaries[name]
        assert s["events"].get("launch", 0) > 0
        assert s["residency_violations"] == 0
        machines = sim.results[name].cluster.machines.values()
        for m in machines:
            if m.rented:
                assert residency[(m.provider, m.region)] == "eu", (name, m)


def test_the_same_seed_gives_the_same_result_and_another_seed_does_not() -> None:
    clouds = {c: {"boot_s": 90, "capacity_error_probability": 0.4} for c in ("aws", "gcp", "azure")}
    trace = bursty_trace(minutes=20)
    played = ("policy", "on-demand")
    first = simulate(policy(), trace, settings(seed=11, clouds=clouds), scenarios=played).data()
    again = simulate(policy(), trace, settings(seed=11, clouds=clouds), scenarios=played).data()
    other = simulate(policy(), trace, settings(seed=12, clouds=clouds), scenarios=played).data()
    assert without_wall_times(first) == without_wall_times(again)
    assert without_wall_times(first)["events"] != without_wall_times(other)["events"]


def test_decisions_come_from_plan_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    real = planning.plan_step

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[4])  # now
        return real(*args, **kwargs)

    monkeypatch.setattr(controllers, "plan_step", counting)
    sim = simulate(policy(), bursty_trace(minutes=15), settings(), scenarios=("policy",))
    ticks = sim.results["policy"].cluster.ticks
    assert len(calls) == len(ticks) > 15 * 60 / 5 - 1
    assert calls == sorted(calls)


def test_spill_limits_of_the_policy_hold() -> None:
    trace = bursty_trace(busy=8.0)
    one = simulate(policy(max_spilled_replicas=1), trace, settings(), scenarios=("policy",))
    assert one.summaries["policy"]["peak_rented_machines"] == 1
    off = simulate(policy(enabled=False), trace, settings(), scenarios=("policy",))
    assert off.summaries["policy"]["rented_machines"] == 0
    many = simulate(policy(), trace, settings(), scenarios=("policy",))
    assert many.summaries["policy"]["peak_rented_machines"] > 1


def test_spilled_machines_are_given_back_after_the_burst() -> None:
    sim = simulate(policy(), bursty_trace(minutes=45), settings(), scenarios=("policy",))
    c = sim.results["policy"].cluster
    rented = [m for m in c.machines.values() if m.rented]
    assert rented
    assert all(m.terminated_at is not None and m.terminated_at < c.horizon for m in rented)
    assert sim.summaries["policy"]["spill_episodes"]["count"] >= 1
    assert c.ticks[-1].rented == 0


def test_spilling_holds_the_target_that_reserved_only_misses() -> None:
    """A step from 1.5 to 5.5 requests/s, past what two reserved replicas hold. The managed
    endpoint takes the overflow the moment the reserved replicas are full; rented machines
    take over once they boot. Without the endpoint the first minutes of the step miss."""
    fast = {c: {"boot_s": 30, "capacity_error_probability": 0.1} for c in ("aws", "gcp", "azure")}
    st = settings(clouds=fast, replica_start_s=20, weights_gb=2)
    played = ("reserved-only", "rent-only", "policy")
    sim = simulate(with_managed(policy()), bursty_trace(minutes=45, busy=5.5), st, scenarios=played)
    s = sim.summaries
    assert s["reserved-only"]["slo_attainment"] < 0.99 <= s["policy"]["slo_attainment"]
    assert s["rent-only"]["slo_attainment"] < s["policy"]["slo_attainment"]
    assert s["policy"]["cost_usd"]["rented"] > 0 and s["policy"]["served_on_managed"] > 0
    assert s["policy"]["cost_usd"]["reserved"] == s["reserved-only"]["cost_usd"]["reserved"]
    assert s["policy"]["cost_usd"]["overflow"] == pytest.approx(
        s["policy"]["cost_usd"]["rented"] + s["policy"]["cost_usd"]["managed"]
    )
    c = sim.comparison
    assert c["cost_vs_policy"]["policy"] == 1.0
    assert "reserved-only" not in c["holding_slo"] and "policy" in c["holding_slo"]
    holding = {n: s[n]["cost_usd"]["total"] for n in c["holding_slo"]}
    assert c["cheapest_holding_slo"] == min(holding, key=lambda n: holding[n])
    assert not math.isnan(s["policy"]["ttft_s"]["p99"])


def test_settings_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("seed: 1\nreserved:\n  machines: 2\n  discont: 0.3\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert f"{path}:4" in str(caught.value) and "discont" in str(caught.value)


def test_outputs_are_written(tmp_path: Path) -> None:
    sim = simulate(with_managed(policy()), bursty_trace(minutes=10), settings())
    files = sim.write(tmp_path)
    assert {f.name for f in files} == {"simulation.json", "simulation.png", "requests.csv"}
    assert (tmp_path / "simulation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "requests.csv").read_text().splitlines()
    assert len(sim.results) == 6  # every played scenario; the bound has no requests of its own
    assert len(rows) == 1 + len(sim.results) * len(sim.trace)


def test_the_example_settings_file_holds_the_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "simulation.yaml"
    assert load_settings(example) == SimSettings()


def test_capacity_errors_per_offer_override_the_cloud() -> None:
    cloud = (
        SimSettings()
        .cloud("aws")
        .model_copy(update={"offers": {"g6e.xlarge": 0.9, "g6e.xlarge@us-east-1": 1.0}})
    )
    assert cloud.capacity_error("g6e.xlarge", "us-east-1") == 1.0
    assert cloud.capacity_error("g6e.xlarge", "us-west-2") == 0.9
    assert cloud.capacity_error("g6e.2xlarge", "us-east-1") == cloud.capacity_error_probability
    # The cheapest L40S machine on AWS always refuses: provisions walk on to other offers.
    refuse = {"aws": {"boot_s": 60, "capacity_error_probability": 0, "offers": {"g6e.xlarge": 1}}}
    sim = simulate(policy(), bursty_trace(busy=6.0), settings(clouds=refuse), scenarios=("policy",))
    c = sim.results["policy"].cluster
    assert any(e.kind == "capacity_error" and "g6e.xlarge" in e.text for e in c.events)
    rented = [m for m in c.machines.values() if m.rented]
    assert rented and all(m.instance_type != "g6e.xlarge" for m in rented)


def test_a_cloud_out_of_capacity_everywhere_spills_to_the_others() -> None:
    """The cloud with the cheapest offers refuses every launch; each provision's failover list
    reaches the other cloud too, so the burst still spills."""
    base = policy()
    dep = base.deployments["chat"].model_copy(update={"sku": "A100-80GB"})
    p = base.model_copy(update={"deployments": {"chat": dep}})
    offers = default_catalog().offers(OfferRequest("A100-80GB", 1))
    out = offers[0].cloud
    others = {o.cloud for o in offers} - {out}
    assert others  # sold on more than one cloud, else nothing to fail over to
    refuse = {out: {"boot_s": 60, "capacity_error_probability": 1.0}}
    sim = simulate(p, bursty_trace(busy=9.0), settings(clouds=refuse), scenarios=("policy",))
    c = sim.results["policy"].cluster
    assert any(e.kind == "capacity_error" and e.text.startswith(out) for e in c.events)
    rented = [m for m in c.machines.values() if m.rented]
    assert rented and {m.provider for m in rented} <= others
    # The very first provisions get there: none walked only the refusing cloud and failed.
    first_launch = min(e.at for e in c.events if e.kind == "launch")
    assert not [e for e in c.events if e.kind == "provision_failed" and e.at < first_launch]


def test_without_a_cloud_to_rent_from_the_on_demand_baseline_is_left_out() -> None:
    """A deployment kept on owned GPUs: no credentials, no offers, yet the simulation runs."""
    owned = policy(enabled=False, providers=[]).model_copy(update={"credentials": Credentials()})
    sim = simulate(
        owned, bursty_trace(minutes=5), settings(reserved={"machines": 1, "usd_per_gpu_hour": 2})
    )
    assert list(sim.summaries) == [
        "reserved-only",
        "reserved-for-peak",
        "rent-only",
        "policy",
        "hindsight-bound",
    ]
    assert any("no managed-only scenario" in n for n in sim.setup.notes)
    assert any("no on-demand baseline" in n for n in sim.setup.notes)
