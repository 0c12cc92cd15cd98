"""Pieces of the reporter that need no scheduler: message building and the backoff."""

from __future__ import annotations

import random
from pathlib import Path

from agent.gpus import GpuSample
from agent.reporter import build_report
from agent.status import ReplicaState, ReplicaStatus
from common.schedulerlink import Backoff
from common.v1 import agent_pb2 as pb


def test_report_marks_gpus_held_by_replicas() -> None:
    replica = ReplicaStatus(
        replica_id="r1",
        deployment="d",
        model="m",
        runtime="simulated",
        port=31000,
        gpu_indices=(1, 2),
        state=ReplicaState.CRASH_LOOPING,
        state_reason="exit code 1, restart 4 in 30s",
        restarts=4,
    )
    samples = [GpuSample(i, 0, 0.0, True) for i in range(4)]
    report = build_report("node-a", 9, samples, [replica], now=1_700_000_000.25)
    assert [g.replica_id for g in report.gpus] == ["", "r1", "r1", ""]
    assert report.sequence == 9
    assert report.sent_at.ToNanoseconds() == 1_700_000_000_250_000_000
    (message,) = report.replicas
    assert message.state == pb.REPLICA_STATE_CRASH_LOOPING
    assert message.state_reason == "exit code 1, restart 4 in 30s"
    assert not message.HasField("started_at")


def test_backoff_grows_exponentially_is_jittered_and_capped() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0, rng=random.Random(7))
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (60, 30.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling  # spread over the whole range: real jitter
        assert len({round(d, 6) for d in delays}) > 150
    # Once the scheduler's interval is known, the wait never exceeds it.
    assert all(backoff.delay(10, cap_s=2.0) <= 2.0 for _ in range(200))


def test_a_long_reason_is_clipped_so_the_scheduler_accepts_the_report() -> None:
    from scheduler.messages import MAX_TEXT

    reason = "GPU 0 is held by replica chat-seed, " * 20
    replica = ReplicaStatus(
        replica_id="r2",
        deployment="d",
        model="m",
        runtime="simulated",
        port=0,
        gpu_indices=(0,),
        state=ReplicaState.FAILED,
        state_reason=reason,
        restarts=0,
    )
    report = build_report("node-a", 1, [GpuSample(0, 0, 0.0, True)], [replica], now=1.0)
    (message,) = report.replicas
    assert len(message.state_reason) == MAX_TEXT
    assert message.state_reason == reason[: MAX_TEXT - 1] + "\u2026"


def test_registration_carries_advertise_host_and_reports_the_running_cap(tmp_path: Path) -> None:
    from agent.gpus import StaticInventory
    from agent.reporter import build_registration
    from agent.status import ReplicaLoad
    from scheduler.messages import registration_from_pb, registration_to_pb, report_from_pb
    from tests.conftest import agent_config

    config = agent_config("node-a", "127.0.0.1:1", tmp_path / "t", advertise_host="10.1.2.3")
    gpus = StaticInventory.from_config(config.gpus, "node-a").gpus
    message = build_registration(config, gpus, "static", "v", "node-a.internal")
    assert (message.advertise_host, message.hostname) == ("10.1.2.3", "node-a.internal")
    registration = registration_from_pb(message)
    assert registration.replica_host == "10.1.2.3"
    assert registration_to_pb(registration) == message
    plain = registration_from_pb(
        build_registration(config.model_copy(update={"advertise_host": ""}), gpus, "", "v", "h")
    )
    assert plain.replica_host == "h"  # empty: the hostname

    replica = ReplicaStatus(
        "r1", "d", "m", "sglang", 30000, (0,), ReplicaState.HEALTHY,
        load=ReplicaLoad(running_requests=3, max_running_requests=64),
    )  # fmt: skip
    samples = [GpuSample(g.index, 0, 0.0, True) for g in gpus]
    report = build_report("node-a", 1, samples, [replica])
    assert report.replicas[0].load.max_running_requests == 64
    assert report_from_pb(report, registration).replicas[0].load.max_running_requests == 64
