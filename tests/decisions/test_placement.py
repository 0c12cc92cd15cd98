"""Placement: reserved first, then the cheapest offers inside the lock; never outside it."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from decisions.fleetview import AgentView, FleetSnapshot, ReplicaState, ReplicaView
from decisions.placement import place, skip_set
from decisions.policy import Policy, resolve_lock
from providers.catalog import default_catalog

CATALOG = default_catalog()


def policy(**spill: Any) -> Policy:
    spillover = {"enabled": True, "providers": ["aws"], "max_spilled_replicas": 3, **spill}
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
                    "autoscaling": {"target": 4},
                    "spillover": spillover,
                }
            },
        }
    )


def agent(agent_id: str, free: int, **kw: Any) -> AgentView:
    fields: dict[str, Any] = {
        "pool": "reserved-eu",
        "provider": "onprem",
        "region": "fra",
        "residency_group": "eu",
        "connected": True,
        "gpus_total": 8,
        "free_gpus": tuple(range(8 - free, 8)),
    }
    fields.update(kw)
    return AgentView(agent_id, **fields)


def test_reserved_first_whole_replicas_only_connected_agents() -> None:
    snap = FleetSnapshot((agent("a", 4), agent("b", 8), agent("c", 8, connected=False)), ())
    (result,) = place(policy(residency="eu"), snap, {"chat": 2}, CATALOG)
    assert [(p.where, p.agent_id, p.gpu_indices) for p in result.placements] == [
        ("reserved", "b", tuple(range(8))),
        ("cloud", "", ()),
    ]
    cloud = result.placements[1]
    assert cloud.offer is not None
    assert (cloud.offer.cloud, cloud.offer.instance_type, cloud.offer.region) == (
        "aws",
        "p5.48xlarge",
        "eu-north-1",
    )
    assert cloud.reason == (
        "cheapest allowed offer inside residency group 'eu': aws p5.48xlarge in eu-north-1 "
        "at $57.79/h"
    )
    assert result.reason == "1 on reserved GPUs; 1 on cloud offers"


def test_capacity_memory_skips_offer_and_spend_cap_stops() -> None:
    zones = CATALOG.region("aws", "eu-north-1").zones
    skip = skip_set([("aws", "p5.48xlarge", z) for z in zones])
    (result,) = place(
        policy(residency="eu", max_usd_per_hour=70),
        FleetSnapshot((), ()),
        {"chat": 2},
        CATALOG,
        skip_zone=skip,
    )
    assert [p.offer.region for p in result.placements if p.offer] == ["eu-south-2"]
    assert result.unplaced == 1
    assert result.reason == (
        "no reserved GPUs free; 1 on cloud offers; 1 not placed: spend cap: $63.30/h of "
        "$70.00/h in use, the cheapest allowed offer costs $63.30/h"
    )


def test_lock_nothing_sells_is_an_error_not_a_fallback() -> None:
    (result,) = place(policy(residency="me"), FleetSnapshot((), ()), {"chat": 1}, CATALOG)
    assert result.placements == ()
    assert result.lock_error == (
        "no region of residency group 'me' sells 8x H100-80GB on aws; nothing is placed "
        "outside the lock"
    )


def test_scale_down_dearest_spilled_first_never_reserved() -> None:
    agents = (
        agent("r", 0),
        agent("x", 0, pool="spill", provider="aws", region="eu-north-1", usd_per_hour=57.0),
        agent("y", 0, pool="spill", provider="aws", region="eu-south-2", usd_per_hour=63.0),
    )
    replicas = tuple(
        ReplicaView(f"chat-{a}", "chat", a, ReplicaState.HEALTHY) for a in ("r", "x", "y")
    )
    (result,) = place(
        policy(residency="eu"), FleetSnapshot(agents, replicas), {"chat": -3}, CATALOG
    )
    assert [r.replica_id for r in result.releases] == ["chat-y", "chat-x"]
    assert result.unplaced == 1
    assert "reserved replicas are kept, they are already paid for" in result.reason


def test_spilled_replica_outside_lock_is_released() -> None:
    agents = (agent("u", 0, pool="spill", provider="aws", region="us-east-1", usd_per_hour=55.0),)
    replicas = (ReplicaView("chat-u", "chat", "u", ReplicaState.HEALTHY),)
    (result,) = place(policy(residency="eu"), FleetSnapshot(agents, replicas), {}, CATALOG)
    assert [(r.replica_id, r.reason) for r in result.releases] == [
        ("chat-u", "runs in aws us-east-1, outside residency group 'eu'")
    ]


GROUPS = ["eu", "us", "uk", "apac", None]
REGIONS = [(c.cloud, r) for c in CATALOG.clouds.values() for r in c.regions]
SKUS = [("H100-80GB", 8), ("H100-80GB", 1), ("L40S", 1), ("A100-80GB", 8), ("H200", 8)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Policy, FleetSnapshot, dict[str, int], frozenset[Any]]:
    deployments = {}
    n = draw(st.integers(1, 3))
    for i in range(n):
        sku, gpus = draw(st.sampled_from(SKUS))
        deployments[f"d{i}"] = {
            "model": "m",
            "weights": "s3://b/m",
            "sku": sku,
            "gpus": gpus,
            "pools": [draw(st.sampled_from(["p0", "p1"]))],
            "max_replicas": 20,
            "autoscaling": {"target": 1},
            "spillover": {
                "enabled": draw(st.booleans()),
                "providers": draw(st.lists(st.sampled_from(["aws", "gcp", "azure"]), unique=True)),
                "residency": draw(st.sampled_from(GROUPS)),
                "max_spilled_replicas": draw(st.integers(0, 5)),
            },
        }
    pol = Policy.model_validate(
        {
            "credentials": {c: {"profile": "p"} for c in ("aws", "gcp", "azure")},
            "deployments": deployments,
        }
    )
    agents = []
    replicas = []
    for i in range(draw(st.integers(0, 6))):
        cloud, region = draw(st.sampled_from(REGIONS))
        free = draw(st.integers(0, 8))
        agents.append(
            AgentView(
                f"a{i}",
                draw(st.sampled_from(["p0", "p1", "spill"])),
                draw(st.sampled_from(["onprem", cloud])),
                region,
                draw(st.sampled_from(["eu", "us", "uk", ""])),
                draw(st.booleans()),
                8,
                tuple(range(8 - free, 8)),
                usd_per_hour=draw(st.floats(0, 100)),
            )
        )
        if draw(st.booleans()):
            replicas.append(
                ReplicaView(
                    f"r{i}", draw(st.sampled_from(list(deployments))), f"a{i}", ReplicaState.HEALTHY
                )
            )
    changes = {name: draw(st.integers(-3, 6)) for name in deployments}
    blocked = frozenset(
        draw(
            st.lists(
                st.sampled_from(
                    [
                        ("aws", "p5.48xlarge", "eu-north-1a"),
                        ("gcp", "a3-highgpu-8g", "europe-west4-b"),
                    ]
                )
            )
        )
    )
    return pol, FleetSnapshot(tuple(agents), tuple(replicas)), changes, blocked


@settings(max_examples=10_000, deadline=None)
@given(scenarios())
def test_no_placement_outside_the_lock(
    scenario: tuple[Policy, FleetSnapshot, dict[str, int], frozenset[Any]],
) -> None:
    pol, snap, changes, blocked = scenario
    agents = {a.agent_id: a for a in snap.agents}
    for result in place(pol, snap, changes, CATALOG, skip_zone=skip_set(blocked)):
        dep = pol.deployments[result.deployment]
        lock = resolve_lock(pol, dep, CATALOG)
        for p in result.placements:
            if p.where == "reserved":
                a = agents[p.agent_id]
                assert a.connected and a.pool in dep.pools
                assert lock.allows_agent(a.residency_group)
                assert len(p.gpu_indices) == dep.gpus
            else:
                assert p.offer is not None and dep.spillover.enabled
                assert lock.allows_region(p.offer.cloud, p.offer.region)
                assert p.offer.cloud in (dep.spillover.providers or ["aws", "gcp", "azure"])
                assert not any(
                    (p.offer.cloud, p.offer.instance_type, z) in blocked for z in p.offer.zones
                )
        clouds = sum(1 for p in result.placements if p.where == "cloud")
        assert clouds <= dep.spillover.max_spilled_replicas


def test_no_cloud_allowed_means_nothing_is_rented() -> None:
    """An empty provider list (none listed, no credentials) is no cloud, not every cloud."""
    unchecked = Policy.model_validate(
        {
            "deployments": {
                "chat": {
                    "model": "m",
                    "weights": "s3://b/m",
                    "sku": "H100-80GB",
                    "gpus": 8,
                    "max_replicas": 8,
                    "autoscaling": {"target": 4},
                    "spillover": {"enabled": True, "max_spilled_replicas": 3},
                }
            }
        }
    )
    (result,) = place(unchecked, FleetSnapshot((), ()), {"chat": 1}, CATALOG)
    assert result.placements == () and result.unplaced == 1
    assert "no cloud may be rented from" in result.lock_error
