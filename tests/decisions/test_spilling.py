"""One planning step with the gateways' fast signal and the cost model: when to rent, when to
release, one line of numbers each time, and never outside the lock or the limits."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decisions.fleetview import AgentView, FleetSnapshot, GatewayLoad, ReplicaState, ReplicaView
from decisions.planning import offers_in_lock, plan_step
from decisions.plantypes import PlanInput, PlanOutput, trim_samples
from decisions.policy import Policy, resolve_lock
from tests.decisions.test_placement import CATALOG, agent

#: The cheapest 8x H100 inside `eu` on aws and gcp in the catalog the tests use.
EU_PRICE = 57.792


def cost_policy(*, episode_s: float = 3600, release_after_s: float = 20, **spill: Any) -> Policy:
    """chat on one reserved 8-GPU agent, hosted-eu inside the `eu` lock at $2/$6 per million
    input/output tokens (3e-6 a token at 75 % input), 8,000 tok/s and 64 requests a replica
    (125 tok/s a request), a 300 s cold start, a 60 s billing minimum."""
    spillover = {
        "enabled": True,
        "providers": ["aws", "gcp"],
        "residency": "eu",
        "max_spilled_replicas": 3,
        "scale_up_window_s": 60,
        "cool_down_s": 600,
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
                    "autoscaling": {
                        "target": 4,
                        "max_step_up": 2,
                        "costs": {
                            "replica_tokens_per_s": 8000,
                            "cold_start_s": 300,
                            "billing_minimum_s": 60,
                            "expected_episode_s": episode_s,
                            "input_token_share": 0.75,
                            "release_ratio": 1.5,
                            "release_after_s": release_after_s,
                        },
                    },
                    "slo": {"ttft_s": 2.0, "saturated_queue_age": 0.25},
                    "spillover": spillover,
                    "gateway": {"max_concurrency_per_replica": 64},
                    "managed": [
                        {
                            "name": "hosted-eu",
                            "base_url": "https://llm.eu.example.com/v1",
                            "residency_group": "eu",
                            "usd_per_million_input_tokens": 2.0,
                            "usd_per_million_output_tokens": 6.0,
                            "max_concurrency": 64,
                        }
                    ],
                }
            },
        }
    )


def ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"chat-{next(counter)}"


def rented_agent(agent_id: str = "s") -> AgentView:
    spilled = agent(agent_id, 0, pool="spill-aws", provider="aws", region="eu-north-1")
    return dataclasses.replace(spilled, key=f"provision-{agent_id}", usd_per_hour=EU_PRICE)


def healthy(replica_id: str, agent_id: str) -> ReplicaView:
    return ReplicaView(replica_id, "chat", agent_id, ReplicaState.HEALTHY)


def test_the_cheapest_offer_is_the_one_the_arithmetic_uses() -> None:
    pol = cost_policy()
    dep = pol.deployments["chat"]
    assert offers_in_lock(pol, dep, CATALOG)[0].usd_per_hour == EU_PRICE


def test_overflow_worth_a_rental_rents_one_on_the_tick_that_sees_it() -> None:
    # O = 10,000 tok/s, T = 8,000: 2 replicas asked, no reserved GPU free.
    # Prior 3,600 s, age 0: R = 3,600, L = 3,300 s. h = 57.792 $/h = 0.016053 $/s.
    # K = 0.016053 * (3,300 + 300) = 57.79 $. S1 = 8,000 * 3e-6 * 3,300 = 79.20 > 57.79: rent.
    # S2 = 2,000 * 3e-6 * 3,300 = 19.80 <= 57.79: not the second.
    snap = FleetSnapshot(
        (agent("a", 0),),
        (healthy("r0", "a"),),
        {"chat": GatewayLoad(overflow_tokens_per_s=10_000, in_flight={"r0": 64}, gateways=1)},
    )
    out = plan_step(cost_policy(), snap, CATALOG, PlanInput("chat"), 100.0, ids())
    assert [s.where for s in out.starts] == ["cloud"], out.reason
    assert out.desired == 2 and out.current == 1
    assert "$79.20 > rental $57.79 incl. 300s cold start; renting 1" in out.reason
    assert "(a replica: 8000 tok/s, assumed)" in out.reason
    assert out.episode_started_at == 100.0 and out.episode_seen_at == 100.0


def test_overflow_not_worth_a_rental_stays_on_the_managed_endpoint() -> None:
    # Prior 600 s: R = 600, L = 300 s. K = 0.016053 * (300 + 300) = 9.63 $.
    # S1 = 8,000 * 3e-6 * 300 = 7.20 <= 9.63: stay.
    snap = FleetSnapshot(
        (agent("a", 0),),
        (healthy("r0", "a"),),
        {"chat": GatewayLoad(overflow_tokens_per_s=10_000, in_flight={"r0": 64}, gateways=1)},
    )
    out = plan_step(cost_policy(episode_s=600), snap, CATALOG, PlanInput("chat"), 100.0, ids())
    assert out.starts == [] and out.desired == 1
    assert out.reason.startswith(
        "managed overflow 10.0k tok/s on hosted-eu ≈ $86.40/h; over the expected 600s left of "
        "the episode a replica would serve 300s and save $7.20 <= rental $9.63 incl. 300s cold "
        "start; staying on hosted-eu"
    ), out.reason
    # 8,000 tok/s * 3e-6 * 3,600 = 86.40 $/h: what the first replica's share costs on hosted-eu.
    assert "\n" not in out.reason


def test_measured_replica_throughput_replaces_the_assumed_one_while_overflowing() -> None:
    # r0 reports 1,000 generated tok/s: 1,000 / (1 - 0.75) = 4,000 tok/s in all, half the
    # policy's 8,000. S1 = 4,000 * 3e-6 * 3,300 = 39.60 <= K = 57.79: stay (with the assumed
    # 8,000 the same overflow rents, see above).
    busy = ReplicaView("r0", "chat", "a", ReplicaState.HEALTHY, generation_tokens_per_s=1000.0)
    snap = FleetSnapshot(
        (agent("a", 0),),
        (busy,),
        {"chat": GatewayLoad(overflow_tokens_per_s=10_000, in_flight={"r0": 64}, gateways=1)},
    )
    out = plan_step(cost_policy(), snap, CATALOG, PlanInput("chat"), 100.0, ids())
    assert out.starts == [], out.reason
    assert "save $39.60 <= rental $57.79" in out.reason
    assert "(a replica: 4000 tok/s, measured)" in out.reason


def test_the_episode_history_decides_against_the_prior() -> None:
    # The prior (3,600 s) would rent, but episodes lasted 400 and 500 s and this one is 100 s
    # old: R = mean(300, 400) = 350, L = 50 s; K = 0.016053 * 350 = 5.62 $;
    # S1 = 8,000 * 3e-6 * 50 = 1.20: stay.
    snap = FleetSnapshot(
        (agent("a", 0),),
        (healthy("r0", "a"),),
        {"chat": GatewayLoad(overflow_tokens_per_s=10_000, in_flight={"r0": 64}, gateways=1)},
    )
    request = PlanInput(
        "chat", episode_started_at=100.0, episode_seen_at=195.0, episodes_s=[400.0, 500.0]
    )
    out = plan_step(cost_policy(), snap, CATALOG, request, 200.0, ids())
    assert out.starts == [], out.reason
    assert "expected 350s left" in out.reason and "save $1.20 <= rental $5.62" in out.reason
    assert out.episodes_s == [400.0, 500.0] and out.episode_started_at == 100.0


def test_free_reserved_gpus_take_overflow_whatever_it_costs() -> None:
    snap = FleetSnapshot(
        (agent("a", 8),),
        (),
        {"chat": GatewayLoad(overflow_tokens_per_s=500, gateways=1)},
    )
    pol = cost_policy(episode_s=60)  # no rental could ever pay off
    pol.deployments["chat"].min_replicas = 0
    out = plan_step(pol, snap, CATALOG, PlanInput("chat"), 100.0, ids())
    assert [(s.where, s.agent_id) for s in out.starts] == [("reserved", "a")], out.reason
    assert "1 on free reserved GPUs for 500 tok/s of overflow" in out.reason


def test_a_queue_older_than_the_slo_allows_starts_a_replica_within_one_tick() -> None:
    # 0.25 x 2 s = 0.5 s. The managed endpoint is full too (the gateway queues only then),
    # so no cost is weighed: the saturated tick rents.
    def snap(oldest: float) -> FleetSnapshot:
        load = GatewayLoad(
            queue_depth=5, oldest_queued_s=oldest, in_flight={"r0": 60, "hosted-eu": 64}
        )
        return FleetSnapshot((agent("a", 0),), (healthy("r0", "a"),), {"chat": load})

    young = plan_step(cost_policy(), snap(0.45), CATALOG, PlanInput("chat"), 100.0, ids())
    assert young.starts == []
    old = plan_step(cost_policy(), snap(0.55), CATALOG, PlanInput("chat"), 100.0, ids())
    assert [s.where for s in old.starts] == ["cloud"]
    assert old.reason.startswith(
        "saturated now: 5 queued at the gateways, the oldest for 0.55s > 0.50s (0.25 x 2s TTFT); +1"
    ), old.reason


def test_a_rented_replica_carrying_little_is_released_after_the_sustained_period() -> None:
    # r1 has 6 in flight; r0 has 60 of 64: reserved room 4, taken at 1/1.5: 2.67 to r0,
    # 3.33 to hosted-eu at 125 tok/s a request: 3.33 * 125 * 3e-6 * 3,600 = 4.50 $/h.
    # Keeping costs 57.79 > 1.5 * 4.50 = 6.75: cheaper to release; released once that held
    # for 20 s, whatever the windowed signal says.
    load = GatewayLoad(in_flight={"r0": 60, "r1": 6}, gateways=1)
    snap = FleetSnapshot(
        (agent("a", 0), rented_agent()), (healthy("r0", "a"), healthy("r1", "s")), {"chat": load}
    )
    pol = cost_policy()
    request = PlanInput("chat")
    out = plan_step(pol, snap, CATALOG, request, 100.0, ids())
    assert out.releases == []
    assert "r1 cheaper to release: $57.79/h > 1.5x $4.50/h" in out.reason
    assert "for 0s of 20s" in out.reason
    for now in (110.0, 120.0):
        request = dataclasses.replace(request, cheaper_since=out.cheaper_since)
        out = plan_step(pol, snap, CATALOG, request, now, ids())
    assert [(r.replica_id, r.cloud, r.key) for r in out.releases] == [("r1", "aws", "provision-s")]
    assert out.releases[0].reason.endswith("for 20s; releasing")
    assert out.desired == 1 and "r1 released by cost" in out.reason


def test_a_rented_replica_the_traffic_needs_is_kept() -> None:
    # r1 has 30 in flight, no reserved room: 30 * 125 * 3e-6 * 3,600 = 40.50 $/h on hosted-eu;
    # 1.5 * 40.50 = 60.75 >= 57.79: worth keeping.
    load = GatewayLoad(in_flight={"r0": 64, "r1": 30}, gateways=1)
    snap = FleetSnapshot(
        (agent("a", 0), rented_agent()), (healthy("r0", "a"), healthy("r1", "s")), {"chat": load}
    )
    out = plan_step(cost_policy(release_after_s=0), snap, CATALOG, PlanInput("chat"), 100.0, ids())
    assert out.releases == [] and out.cheaper_since == []
    assert out.episode_started_at == 100.0  # a rented replica still needed keeps the episode on


def test_no_release_by_cost_that_the_windowed_signal_would_undo() -> None:
    """r1 carries 2 requests: cheap on hosted-eu. With running_per_replica at 2 on each of
    the two replicas, one fewer leaves 2 * 2 / 1 = 4, not over the target 4: released. At 2
    and 3 (mean 2.5) one fewer leaves 5 > 4: kept, or the window would rent it again and cost
    would release it again (a flap)."""
    pol = cost_policy(release_after_s=0)
    dep = pol.deployments["chat"]
    scaling = dep.autoscaling.model_copy(update={"signal": "running_per_replica"})
    pol.deployments["chat"] = dep.model_copy(update={"autoscaling": scaling})
    load = GatewayLoad(in_flight={"r0": 2, "r1": 2}, gateways=1)

    def plan(running: tuple[int, int]) -> PlanOutput:
        replicas = tuple(
            ReplicaView(rid, "chat", aid, ReplicaState.HEALTHY, running_requests=n)
            for rid, aid, n in (("r0", "a", running[0]), ("r1", "s", running[1]))
        )
        snap = FleetSnapshot((agent("a", 0), rented_agent()), replicas, {"chat": load})
        return plan_step(pol, snap, CATALOG, PlanInput("chat"), 100.0, ids())

    assert [r.replica_id for r in plan((2, 2)).releases] == ["r1"]
    kept = plan((2, 3))  # mean 2.5
    assert kept.releases == []
    assert (
        "one rented replica fewer would put running_per_replica at 5.00 over its target 4: "
        "no release by cost"
    ) in kept.reason


class MiniFleet:
    """Just enough of a fleet to run plan_step tick after tick: a rented replica serves on the
    tick after it is planned, a released one is gone at once; demand (requests in flight)
    fills the reserved replica first, then rented ones, then hosted-eu (125 tok/s a request)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.rented: list[str] = []
        self.coming: list[str] = []
        self.request = PlanInput("chat")
        self.starts = 0
        self.releases = 0

    def snapshot(self, demand: int) -> FleetSnapshot:
        in_flight = {"r0": min(demand, 64)}
        left = demand - in_flight["r0"]
        for rid in self.rented:
            in_flight[rid] = min(left, 64)
            left -= in_flight[rid]
        agents = (agent("a", 0), *(rented_agent(f"m-{r}") for r in self.rented))
        replicas = (healthy("r0", "a"), *(healthy(r, f"m-{r}") for r in self.rented))
        load = GatewayLoad(overflow_tokens_per_s=125.0 * left, in_flight=in_flight, gateways=1)
        return FleetSnapshot(agents, replicas, {"chat": load})

    def tick(self, demand: int, now: float) -> PlanOutput:
        self.rented += self.coming
        self.coming = []
        out = plan_step(self.policy, self.snapshot(demand), CATALOG, self.request, now, ids())
        for _ in out.starts:
            self.coming.append(f"x{self.starts}")
            self.starts += 1
        for release in out.releases:
            self.rented.remove(release.replica_id)
            self.releases += 1
        samples = self.request.samples + ([out.sample] if out.sample else [])
        self.request = dataclasses.replace(
            self.request,
            samples=trim_samples(samples, now - out.window_s),
            episode_started_at=out.episode_started_at,
            episode_seen_at=out.episode_seen_at,
            episodes_s=out.episodes_s,
            cheaper_since=out.cheaper_since,
        )
        return out


def test_an_alternating_signal_does_not_flap() -> None:
    """Demand alternates every 5 s tick between 164 requests (100 beyond the reserved replica:
    a rental pays for itself) and 74 (the rented replica then carries 10, cheaper to release
    on its own). The release needs 20 s cheaper without a break, so the rental stays."""
    fleet = MiniFleet(cost_policy())
    for tick in range(60):
        fleet.tick(164 if tick % 2 == 0 else 74, 100.0 + 5 * tick)
    assert (fleet.starts, fleet.releases) == (1, 0)
    # Without the sustained period the same signal flaps: released on each quiet tick, rented
    # again on the next busy one.
    flapping = MiniFleet(cost_policy(release_after_s=0))
    for tick in range(60):
        flapping.tick(164 if tick % 2 == 0 else 74, 100.0 + 5 * tick)
    assert flapping.releases > 3 and flapping.starts > 3


def test_quiet_after_a_burst_releases_the_rental_and_records_the_episode() -> None:
    fleet = MiniFleet(cost_policy())
    now = 100.0
    for _ in range(20):  # 100 s of burst
        fleet.tick(164, now)
        now += 5
    assert fleet.rented and fleet.starts == 1
    for _ in range(30):  # 150 s quiet: 10 requests in all, the reserved replica takes them
        out = fleet.tick(10, now)
        now += 5
    assert fleet.rented == [] and fleet.releases == 1, out.reason
    # The episode ran from 100 s until the rental was no longer needed (195 s) and ended
    # 30 s later.
    assert fleet.request.episodes_s == [95.0] and fleet.request.episode_started_at is None


spend = st.floats(min_value=0, max_value=50_000, allow_nan=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    overflow=spend,
    queue=st.integers(min_value=0, max_value=500),
    oldest=st.floats(min_value=0, max_value=30, allow_nan=False),
    rented=st.integers(min_value=0, max_value=4),
    free=st.sampled_from([0, 8]),
    limit=st.integers(min_value=1, max_value=3),
    cap=st.one_of(st.none(), st.floats(min_value=60, max_value=300)),
    episode=st.floats(min_value=1, max_value=20_000),
    residency=st.sampled_from(["eu", "us", "ch"]),
)
def test_no_decision_rents_outside_the_lock_or_beyond_the_limits(
    overflow: float,
    queue: int,
    oldest: float,
    rented: int,
    free: int,
    limit: int,
    cap: float | None,
    episode: float,
    residency: str,
) -> None:
    pol = cost_policy(
        episode_s=episode, max_spilled_replicas=limit, max_usd_per_hour=cap, residency=residency
    )
    if residency != "eu":  # an endpoint outside the lock is never used: keep it inside
        managed = (
            pol.deployments["chat"].managed[0].model_copy(update={"residency_group": residency})
        )
        pol.deployments["chat"].managed = [managed]
    machines = [rented_agent(f"m{i}") for i in range(rented)]
    replicas = [healthy("r0", "a"), *(healthy(f"x{i}", f"m{i}") for i in range(rented))]
    load = GatewayLoad(
        queue_depth=queue,
        oldest_queued_s=oldest if queue else 0.0,
        overflow_tokens_per_s=overflow,
        in_flight={r.replica_id: 64 for r in replicas},
        gateways=1,
    )
    snap = FleetSnapshot((agent("a", free), *machines), tuple(replicas), {"chat": load})
    out = plan_step(pol, snap, CATALOG, PlanInput("chat"), 100.0, ids())
    dep = pol.deployments["chat"]
    lock = resolve_lock(pol, dep, CATALOG)
    cloud = [s for s in out.starts if s.where == "cloud"]
    for start in cloud:
        assert start.offers
        for offer in start.offers:
            assert lock.allows_region(offer.cloud, offer.region), (offer, residency)
    inside = [m for m in machines if lock.allows_region(m.provider, m.region)]
    released = {r.replica_id for r in out.releases}
    kept = [i for i in range(rented) if f"x{i}" not in released and machines[i] in inside]
    assert len(kept) + len(cloud) <= limit, out.reason
    if cap is not None and cloud:
        chosen = sum(s.offers[0].usd_per_hour for s in cloud)
        assert sum(EU_PRICE for _ in kept) + chosen <= cap + 1e-6, out.reason
    assert len(out.starts) <= dep.autoscaling.max_step_up
    assert out.reason and "\n" not in out.reason
