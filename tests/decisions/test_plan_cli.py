"""``spillway plan`` against a real in-process scheduler fed by real reporters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.status import ReplicaLoad, ReplicaState, ReplicaStatus
from spillway.cli import main
from tests.conftest import SchedulerFactory, Tokens, eventually
from tests.scheduler.test_server import reporting

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"

BUSY = ReplicaStatus(
    replica_id="chat-eu-0",
    deployment="chat-eu",
    model="llama-3.1-70b",
    runtime="simulated",
    port=30000,
    gpu_indices=(0, 1, 2, 3, 4, 5, 6, 7),
    state=ReplicaState.HEALTHY,
    load=ReplicaLoad(
        running_requests=40,
        queued_requests=30,
        kv_cache_usage=0.9,
        generation_tokens_per_second=1000.0,
        cache_hit_rate=0.1,
    ),
    restarts=0,
    started_at=1_700_000_000.0,
)


async def test_plan_against_live_fleet(
    start_scheduler: SchedulerFactory,
    tokens: Tokens,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scheduler = await start_scheduler()
    async with (
        reporting(scheduler, tokens, tmp_path, "node-a", replicas=(BUSY,)),
        reporting(scheduler, tokens, tmp_path, "node-b"),
    ):
        await eventually(
            lambda: all(
                (r := scheduler.fleet.get(a)) is not None and r.report for a in ("node-a", "node-b")
            )
        )
        argv = [
            "plan",
            "--policy",
            str(EXAMPLE),
            "--scheduler",
            f"127.0.0.1:{scheduler.port}",
            "--token-file",
            str(tokens.write("oncall", tmp_path)),
        ]
        code = await asyncio.to_thread(main, argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "chat-eu: 1 replicas, queued_per_replica 30.00 (target 4) -> 3" in out
    assert "  + reserved: free reserved GPUs: 8 on node-b (pool reserved-eu)" in out
    assert (
        "  + cloud: cheapest allowed offer inside residency group 'eu': aws p5.48xlarge in "
        "eu-north-1 at $57.79/h" in out
    )
    assert "summarize: 0 replicas" in out
