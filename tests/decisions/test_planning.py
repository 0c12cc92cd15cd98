"""One planning step: pending replicas count and hold their GPUs, releases do not count,
failover lists stay inside the lock and the spend cap. Pure: no Temporal needed."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from decisions.fleetview import FleetSnapshot, GatewayLoad, ReplicaState, ReplicaView
from decisions.planning import plan_step, with_pending
from decisions.plantypes import (
    PendingReplica,
    PlanInput,
    PlannedRelease,
    SamplePoint,
    trim_samples,
)
from decisions.policy import Policy
from tests.decisions.test_placement import CATALOG, agent


def policy(**spill: Any) -> Policy:
    spillover = {
        "enabled": True,
        "providers": ["aws", "gcp"],
        "residency": "eu",
        "max_spilled_replicas": 3,
        "scale_up_window_s": 2,
        "cool_down_s": 10,
        **spill,
    }
    return Policy.model_validate(
        {
            "credentials": {"aws": {"profile": "p"}, "gcp": {"profile": "p"}},
            "deployments": {
                "chat": {
                    "model": "m",
                    "weights": "s3://b/m",
                    "sku": "H100-80GB",
                    "gpus": 8,
                    "pools": ["reserved-eu"],
                    "max_replicas": 8,
                    "autoscaling": {"target": 4, "max_step_up": 2},
                    "spillover": spillover,
                }
            },
        }
    )


def busy(queued: int, *ids: str) -> tuple[ReplicaView, ...]:
    return tuple(ReplicaView(i, "chat", "a", ReplicaState.HEALTHY, 8, queued) for i in ids)


def ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"chat-{next(counter)}"


SATURATED = [SamplePoint(90.0, 9.0), SamplePoint(97.0, 9.0)]


def test_saturation_fills_reserved_then_rents_with_failover_offers_inside_the_lock() -> None:
    snap = FleetSnapshot((agent("a", 8),), busy(9, "r0"))
    out = plan_step(
        policy(max_usd_per_hour=130), snap, CATALOG, PlanInput("chat", SATURATED), 100.0, ids()
    )
    assert out.exists and out.current == 1 and out.desired == 3
    assert [(s.where, s.agent_id, s.gpu_indices) for s in out.starts] == [
        ("reserved", "a", list(range(8))),
        ("cloud", "", []),
    ]
    offers = out.starts[1].offers
    assert offers, out.reason
    chosen = offers[0]
    # Every fallback is inside `eu`, and each fits what is left of the cap after the chosen one.
    for offer in offers:
        assert CATALOG.region(offer.cloud, offer.region).residency == "eu"
        assert offer.usd_per_hour <= 130 + 1e-9
    assert [o.usd_per_hour for o in offers[1:]] == sorted(o.usd_per_hour for o in offers[1:])
    assert chosen.usd_per_hour <= min(o.usd_per_hour for o in offers)
    assert out.template is not None and out.template.gpus == 8


def test_pending_replicas_hold_their_gpus_and_stop_further_scale_up() -> None:
    snap = FleetSnapshot((agent("a", 8),), busy(9, "r0"))
    pending = [PendingReplica("chat-p", "provision-chat-p", "reserved", "a", [0, 1, 2, 3])]
    view = with_pending(snap, "chat", pending, set())
    assert view.agents[0].free_gpus == (4, 5, 6, 7)
    assert view.replicas[1].state is ReplicaState.STARTING
    assert [r.replica_id for r in view.replicas] == ["r0", "chat-p"]
    out = plan_step(
        policy(), snap, CATALOG, PlanInput("chat", SATURATED, pending=pending), 100.0, ids()
    )
    assert out.current == 2 and out.starts == []
    assert "still coming up" in out.reason


def test_releasing_replicas_do_not_count_and_a_failure_holds_provisions() -> None:
    snap = FleetSnapshot((agent("a", 0),), busy(9, "r0", "r1"))
    out = plan_step(
        policy(),
        snap,
        CATALOG,
        PlanInput("chat", SATURATED, releasing=["r1"], hold_until=130.0),
        100.0,
        ids(),
    )
    assert out.current == 1
    assert out.starts == []
    assert "the last provision failed; holding for 30s" in out.reason


def test_a_deployment_gone_from_the_policy_ends_and_an_impossible_lock_is_reported() -> None:
    out = plan_step(policy(), FleetSnapshot((), ()), CATALOG, PlanInput("gone"), 1.0, ids())
    assert not out.exists
    locked = policy(residency="ch", providers=["gcp"])
    snap = FleetSnapshot((agent("a", 0),), busy(9, "r0"))
    out = plan_step(locked, snap, CATALOG, PlanInput("chat", SATURATED), 100.0, ids())
    assert out.starts == []
    assert out.lock_error and "nothing is placed outside the lock" in out.lock_error


def test_a_quiet_spell_as_long_as_the_cool_down_releases_the_spilled_replica() -> None:
    """Samples a tick apart: the one just before the window shows the window was covered."""
    spilled = agent("s", 0, pool="spill-aws", provider="aws", region="eu-north-1")
    spilled = dataclasses.replace(spilled, key="provision-chat-1.0", usd_per_hour=57.79)
    replicas = (
        ReplicaView("r0", "chat", "a", ReplicaState.HEALTHY),
        ReplicaView("r1", "chat", "s", ReplicaState.HEALTHY),
    )
    snap = FleetSnapshot((agent("a", 0), spilled), replicas)
    samples: list[SamplePoint] = []
    releases: list[PlannedRelease] = []
    now = 100.0
    while not releases and now < 130:
        out = plan_step(
            policy(), snap, CATALOG, PlanInput("chat", samples, last_change_at=99.0), now, ids()
        )
        assert out.sample is not None
        samples = trim_samples([*samples, out.sample], now - out.window_s)
        releases = out.releases
        now += 0.25
    assert 110.0 <= now - 0.25 <= 110.5, now  # cool-down 10 s after the last change
    assert [(r.replica_id, r.cloud, r.key) for r in releases] == [
        ("r1", "aws", "provision-chat-1.0")
    ]


def test_every_deployment_of_the_policy_is_planned_for_itself() -> None:
    """The second deployment of a policy gets its own placement, not the first one's."""
    from spillway.demo_setup import demo_policy

    two = Policy.model_validate(demo_policy())
    assert list(two.deployments) == ["chat-eu", "summarize"]
    us = agent("us-1", 1, pool="reserved-us", gpus_total=2, free_gpus=(1,), residency_group="us")
    snap = FleetSnapshot(
        (us,), (ReplicaView("s0", "summarize", "us-1", ReplicaState.HEALTHY, 4, 10),)
    )
    samples = [SamplePoint(90.0, 10.0), SamplePoint(99.0, 10.0)]
    out = plan_step(two, snap, CATALOG, PlanInput("summarize", samples), 100.0, ids())
    assert [(s.where, s.agent_id, s.gpu_indices) for s in out.starts] == [("reserved", "us-1", [1])]
    assert out.template is not None and out.template.deployment == "summarize"


def test_nothing_is_started_or_released_while_the_fleet_is_being_observed() -> None:
    """After a restart the fleet is empty until agents report: below min_replicas is not a
    reason to rent, and a quiet spell is not a reason to release."""
    empty = plan_step(
        policy(),
        FleetSnapshot((), ()),
        CATALOG,
        PlanInput("chat"),
        100.0,
        ids(),
        observing="the scheduler started 0.4s ago; agents report within 2s",
    )
    assert empty.current == 0 and empty.desired == 1  # what autoscaling alone would want
    assert empty.starts == [] and empty.releases == []
    assert "the scheduler started 0.4s ago" in empty.reason
    unobserved = plan_step(
        policy(), FleetSnapshot((), ()), CATALOG, PlanInput("chat"), 100.0, ids()
    )
    assert len(unobserved.starts) == 1  # the same plan, with the fleet known, starts one


def test_failover_offers_reach_every_allowed_cloud_before_more_of_one() -> None:
    """When one cloud runs out, a provision must not walk only that cloud's regions."""
    from decisions.planning import failover_offers
    from providers.catalog import OfferRequest

    pol = policy(providers=["aws", "gcp", "azure"])
    pol = pol.model_copy(
        update={
            "credentials": pol.credentials.model_copy(
                update={"azure": pol.credentials.aws}  # a reference, not a secret
            )
        }
    )
    dep = pol.deployments["chat"]
    ranked = [
        o
        for o in CATALOG.offers(OfferRequest("H100-80GB", 8))
        if CATALOG.region(o.cloud, o.region).residency == "eu"
    ]
    clouds = {o.cloud for o in ranked}
    assert len(clouds) == 3
    # The cheapest three all on one cloud would leave the others out without the rule.
    chosen = ranked[0]
    offers = failover_offers(pol, dep, CATALOG, chosen, None, limit=3)
    assert offers[0].instance_type == chosen.instance_type and offers[0].region == chosen.region
    assert {o.cloud for o in offers} == clouds
    assert [o.usd_per_hour for o in offers[1:]] == sorted(o.usd_per_hour for o in offers[1:])
    # With room to spare, the rest are the next cheapest, whatever their cloud.
    many = failover_offers(pol, dep, CATALOG, chosen, None, limit=8)
    assert {o.cloud for o in many} == clouds and len(many) == min(8, len(ranked))


def gateway_policy(kind: str, **spill: Any) -> Policy:
    base = policy(**spill)
    dep = base.deployments["chat"]
    scaling = dep.autoscaling.model_copy(update={"signal": kind})
    dep = dep.model_copy(update={"min_replicas": 0, "autoscaling": scaling})
    return base.model_copy(update={"deployments": {"chat": dep}})


def test_scale_from_zero_on_the_gateways_queue() -> None:
    """No replica at all, so no per-replica signal; requests waiting with no replica anywhere
    are saturation now: the first tick starts a replica on the free reserved GPUs."""
    pol = gateway_policy("queued_at_gateway")
    waiting = {"chat": GatewayLoad(queue_depth=12, oldest_queued_s=0.1, gateways=2)}
    snap = FleetSnapshot((agent("a", 8),), (), waiting)
    out = plan_step(pol, snap, CATALOG, PlanInput("chat"), 100.0, ids())
    assert out.sample is not None and out.sample.value == 12.0
    # ceil(12 queued / 64 a replica) = 1: the queue fits one replica.
    assert out.current == 0 and out.desired == 1, out.reason
    assert [(s.where, s.agent_id) for s in out.starts] == [("reserved", "a")]
    assert "12 queued at the gateways and no healthy replica; +1" in out.reason


def test_overflow_signal_scales_from_zero_and_an_empty_gateway_holds_at_zero() -> None:
    pol = gateway_policy("overflow_tokens_per_s")
    samples = [SamplePoint(90.0, 900.0), SamplePoint(97.0, 900.0)]
    snap = FleetSnapshot((agent("a", 8),), (), {"chat": GatewayLoad(overflow_tokens_per_s=900.0)})
    out = plan_step(pol, snap, CATALOG, PlanInput("chat", samples), 100.0, ids())
    assert out.desired == 2 and len(out.starts) == 2
    quiet = plan_step(
        pol, FleetSnapshot((agent("a", 8),), ()), CATALOG, PlanInput("chat"), 100.0, ids()
    )
    assert quiet.sample is not None and quiet.sample.value == 0.0
    assert quiet.current == quiet.desired == 0 and quiet.starts == []


def test_a_gateway_view_below_the_slo_changes_no_decision() -> None:
    """A queue younger than the SLO allows, beside replicas with room, and no managed endpoint
    to overflow to: the plan is the windowed one it always was (only the episode bookkeeping
    notes the traffic)."""
    snap = FleetSnapshot((agent("a", 8),), busy(9, "r0"))
    with_view = dataclasses.replace(
        snap,
        gateway={
            "chat": GatewayLoad(queue_depth=50, oldest_queued_s=0.4, overflow_tokens_per_s=1e4)
        },
    )
    plain = plan_step(policy(), snap, CATALOG, PlanInput("chat", SATURATED), 100.0, ids())
    viewed = plan_step(policy(), with_view, CATALOG, PlanInput("chat", SATURATED), 100.0, ids())
    assert plain.episode_started_at is None and viewed.episode_started_at == 100.0
    assert dataclasses.replace(viewed, episode_started_at=None, episode_seen_at=None) == plain
    assert with_pending(with_view, "chat", [], {"r0"}).gateway == with_view.gateway
