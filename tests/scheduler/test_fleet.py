"""Fleet state with a hand-driven clock: staleness, forgetting, pools, reconnects."""

from __future__ import annotations

from scheduler.fleet import (
    AgentHealth,
    FleetState,
    Gpu,
    GpuState,
    Labels,
    Registration,
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
