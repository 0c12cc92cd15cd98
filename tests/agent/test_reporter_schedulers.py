"""The reporter against several real schedulers: it reports to every one, and a scheduler that
is dead, or accepts connections and never answers, delays none of the others."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from pathlib import Path

from agent.gpus import StaticInventory
from agent.reporter import Reporter
from scheduler.server import Scheduler
from tests.conftest import SchedulerFactory, Tokens, agent_config, eventually


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def reports(scheduler: Scheduler, agent_id: str = "node-a") -> int:
    record = scheduler.fleet.get(agent_id)
    return 0 if record is None else record.reports_received


async def test_reports_reach_every_scheduler_and_a_silent_one_holds_none_back(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    interval = 0.2
    first = await start_scheduler(report_interval_s=interval)
    # A "scheduler" that accepts TCP connections and never says a word: every call to it hangs
    # until its deadline.
    silent = socket.create_server(("127.0.0.1", 0))
    silent_address = f"127.0.0.1:{silent.getsockname()[1]}"
    later_port = free_port()  # nothing listens here yet
    config = agent_config(
        "node-a",
        f"127.0.0.1:{first.port}",
        tokens.write("node-a", tmp_path),
        scheduler={
            "addresses": [silent_address, f"127.0.0.1:{later_port}", f"127.0.0.1:{first.port}"],
            "token_file": tokens.write("node-a", tmp_path),
        },
    )
    reporter = Reporter(
        config,
        StaticInventory.from_config(config.gpus, "node-a"),
        tokens.clear["node-a"],
        version="test",
        hostname="h",
        rng=random.Random(3),
    )
    assert [s.address for s in reporter.streams] == list(config.scheduler.address_list)
    task = asyncio.create_task(reporter.run())
    try:
        took = await eventually(lambda: reports(first) >= 1, 3.0)
        # Listed last, behind a silent and a dead scheduler, it heard the agent at once...
        assert took < 1.0, took
        # ...and keeps hearing it once per interval.
        before, start = reports(first), time.monotonic()
        await asyncio.sleep(10 * interval)
        rate = (reports(first) - before) / (time.monotonic() - start)
        assert rate > 0.7 / interval, rate
        silent_stream, later_stream, first_stream = reporter.streams
        assert first_stream.connected and not silent_stream.connected
        assert later_stream.last_error is not None and "UNAVAILABLE" in later_stream.last_error

        # The dead one comes up: it hears the agent within its backoff (at most 0.5 s here).
        later = await start_scheduler(report_interval_s=interval, listen=f"127.0.0.1:{later_port}")
        took = await eventually(lambda: reports(later) >= 1, 3.0)
        print(f"a scheduler that came up heard the agent {took:.2f}s later")
        # One process, one instance id, for every scheduler.
        records = [s.fleet.get("node-a") for s in (first, later)]
        assert {r.instance for r in records if r is not None} == {reporter.instance}

        # The first goes away: the other keeps hearing the agent, undisturbed.
        await first.stop(grace=0)
        before = reports(later)
        await asyncio.sleep(5 * interval)
        assert reports(later) - before >= 3
        assert reporter.registrations >= 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        silent.close()
