"""Fleet state with a hand-driven clock: staleness, forgetting, pools, reconnects."""

from __future__ import annotations

from decisions.fleetview import ReplicaState
from scheduler.fleet import (
    AgentHealth,
    DeploymentTraffic,
    FleetState,
    GatewayReport,
    Gpu,
    GpuState,
    Labels,
    Registration,
    Replica,
    ReplicaLoad,
    Report,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _registration(agent_id: str, pool: str = "reserved-eu", gpus: int = 8) -> Registration:
    return Registration(
        agent_id=agent_id,
        agent_version="1",
        labels=Labels(pool=pool, provider="onprem", region="eu-frankfurt"),
        gpus=tuple(Gpu(i, f"u{i}", "H100", 80 << 30) for i in range(gpus)),
        gpu_source="static",
        hostname="h",
        task_queue=f"agent-{agent_id}",
    )


def _report(sequence: int, busy: int, gpus: int = 8, unhealthy: int = 0) -> Report:
    states = []
    for i in range(gpus):
        states.append(
            GpuState(
                index=i,
                memory_used_bytes=0,
                utilization=0.0,
                replica_id="r0" if i < busy else "",
                healthy=i < gpus - unhealthy,
            )
        )
    return Report(sequence=sequence, sent_at=0.0, gpus=tuple(states), replicas=())


def test_stale_after_n_intervals_and_gone_after_m() -> None:
    clock = Clock()
    fleet = FleetState(2.0, 3, 10, clock=clock)
    fleet.register(_registration("a"))
    record = fleet.get("a")
    assert record is not None
    clock.now += 6.0  # exactly three intervals: still connected
    assert fleet.health(record) is AgentHealth.CONNECTED
    clock.now += 0.1
    assert fleet.health(record) is AgentHealth.STALE
    assert fleet.sweep() == []
    assert fleet.apply("a", _report(1, 0))  # a report makes it fresh again
    assert fleet.health(record) is AgentHealth.CONNECTED
    clock.now += 20.0
    assert fleet.sweep() == []
    clock.now += 0.1
    assert fleet.sweep() == ["a"]
    assert fleet.get("a") is None
    assert not fleet.apply("a", _report(2, 0))  # must register again


def test_pools_count_free_healthy_gpus_of_connected_agents_only() -> None:
    clock = Clock()
    fleet = FleetState(1.0, 3, 10, clock=clock)
    fleet.register(_registration("a"))
    fleet.register(_registration("b"))
    fleet.register(_registration("c", pool="reserved-us", gpus=4))
    fleet.apply("a", _report(1, busy=3))
    fleet.apply("b", _report(1, busy=0, unhealthy=2))
    assert [(p.pool, p.agents, p.gpus_free, p.gpus_total) for p in fleet.pools()] == [
        ("reserved-eu", 2, 5 + 6, 16),
        ("reserved-us", 1, 4, 4),  # no report yet: its inventory counts as free
    ]
    clock.now += 5
    fleet.apply("a", _report(2, busy=8))
    assert [(p.pool, p.agents, p.gpus_free, p.gpus_total) for p in fleet.pools()] == [
        ("reserved-eu", 1, 0, 8),
        ("reserved-us", 0, 0, 0),
    ]


def test_reconnect_keeps_last_report_unless_the_gpus_changed() -> None:
    fleet = FleetState(1.0, 3, 10, clock=Clock())
    fleet.register(_registration("a"))
    fleet.apply("a", _report(5, busy=2))
    fleet.register(_registration("a"))
    record = fleet.get("a")
    assert record is not None and record.report is not None
    assert record.report.sequence == 5 and record.reports_received == 1
    fleet.register(_registration("a", gpus=4))
    record = fleet.get("a")
    assert record is not None and record.report is None


def test_reports_per_second_over_the_window() -> None:
    clock = Clock()
    fleet = FleetState(1.0, 3, 10, clock=clock)
    fleet.register(_registration("a"))
    for _ in range(50):
        fleet.apply("a", _report(1, 0))
        clock.now += 0.1
    assert fleet.reports_total == 50
    assert 9.0 <= fleet.reports_per_second() <= 10.0
    clock.now += FleetState.RATE_WINDOW_S + 1
    assert fleet.reports_per_second() == 0.0


def _serving(sequence: int, state: ReplicaState = ReplicaState.HEALTHY, *ids: str) -> Report:
    load = ReplicaLoad(sequence % 7, 0, 0.1, 10.0, 0.0, max_running_requests=32)
    replicas = tuple(
        Replica(i, "chat", "m", "simulated", 30000, (0,), state, "", load, 0, None)
        for i in ids or ("r0",)
    )
    return Report(sequence, 0.0, (), replicas)


def test_routable_version_moves_on_changes_not_on_every_report() -> None:
    clock = Clock()
    fleet = FleetState(1.0, 3, 10, clock=clock)
    calls: list[int] = []
    fleet.on_change = lambda: calls.append(fleet.routable_version)
    fleet.register(_registration("a"))
    fleet.apply("a", _serving(1))
    version = fleet.routable_version
    for n in range(2, 10):  # only the load moves
        clock.now += 1
        fleet.apply("a", _serving(n))
    assert fleet.routable_version == version
    fleet.apply("a", _serving(10, ReplicaState.DRAINING))
    assert fleet.routable_version == version + 1
    fleet.apply("a", _serving(11, ReplicaState.DRAINING, "r0", "r1"))
    assert fleet.routable_version == version + 2
    clock.now += 3.5  # stale: the sweep notices, once
    fleet.sweep()
    fleet.sweep()
    assert fleet.routable_version == version + 3
    fleet.apply("a", _serving(12, ReplicaState.DRAINING, "r0", "r1"))  # back
    assert fleet.routable_version == version + 4
    assert calls == list(range(1, fleet.routable_version + 1))


def test_a_draining_mark_lasts_until_the_replica_leaves() -> None:
    clock = Clock()
    fleet = FleetState(1.0, 3, 10, clock=clock)
    fleet.register(_registration("a"))
    fleet.apply("a", _serving(1, ReplicaState.HEALTHY, "r0", "r1"))
    assert not fleet.mark_draining("nowhere")
    version = fleet.routable_version
    assert fleet.mark_draining("r0")
    assert fleet.mark_draining("r0")  # again: no change
    assert fleet.routable_version == version + 1
    record = fleet.get("a")
    assert record is not None and record.report is not None
    r0, r1 = record.report.replicas
    assert fleet.state_of(r0) is ReplicaState.DRAINING
    assert fleet.state_of(r1) is ReplicaState.HEALTHY
    fleet.apply("a", _serving(2, ReplicaState.HEALTHY, "r0", "r1"))
    assert fleet.draining() == {"r0"}
    fleet.apply("a", _serving(3, ReplicaState.HEALTHY, "r1"))  # r0 left
    assert fleet.draining() == frozenset()
    fleet.apply("a", _serving(4, ReplicaState.HEALTHY, "r1"))
    assert fleet.mark_draining("r1")
    clock.now += 10.5  # the agent is forgotten, and its marks with it
    assert fleet.sweep() == ["a"]
    assert fleet.draining() == frozenset()


def test_gateway_reports_newest_wins_then_stale_then_forgotten() -> None:
    clock = Clock()
    fleet = FleetState(1.0, 3, 10, clock=clock)
    traffic = DeploymentTraffic("chat", 4, 1.5, {"r0": 2, "managed": 1}, (), 10.0, 0)
    fleet.report_gateway(GatewayReport("gw-1", 0.0, (traffic,)))
    clock.now += 2
    newer = DeploymentTraffic("chat", 1, 0.5, {"r0": 1}, (), 0.0, 0)
    fleet.report_gateway(GatewayReport("gw-1", 1.0, (newer,)))
    fleet.report_gateway(GatewayReport("gw-2", 1.0, (traffic,)))
    records = fleet.gateways()
    assert [(g.gateway_id, g.in_flight("r0")) for g in records] == [("gw-1", 1), ("gw-2", 2)]
    assert fleet.gateway_health(records[0]) is AgentHealth.CONNECTED
    clock.now += 3.5
    assert fleet.gateways(within_s=fleet.stale_after_s) == []
    assert fleet.gateway_health(records[0]) is AgentHealth.STALE
    fleet.sweep()
    assert len(fleet.gateways()) == 2  # stale, not gone
    clock.now += 7
    fleet.sweep()
    assert fleet.gateways() == []
