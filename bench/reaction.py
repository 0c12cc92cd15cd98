"""Reaction time of the control plane: from saturation to a launch call, and to a serving replica.

Each run builds the whole control plane on loopback: a Temporal dev server and EC2/S3 (moto,
shared by all runs), the scheduler (gRPC server and control plane) in this process, and one
reserved agent process whose only replica (simulated runtime, two requests at a time) takes all
its GPUs. Agents report once a second; the deployment scales up after one second of saturation.
Chat clients then saturate the replica, and three instants are taken from the scheduler's own
state:

- the arrival of the first report in which the replica's queue is over the target;
- the launch call of the provision (the control plane's ``on_launch`` hook);
- the arrival of the first report in which the replica on the rented machine (a stand-in agent
  process, weights prefetched from S3) is healthy.

Reaction = launch - first saturated report. It includes the one-second window by design, the
wait for the next autoscaling tick, and the Temporal round trips. The runs alternate the tick
(``spill.decide_every_s``) between the report interval (1 s, the default) and 0.25 s, to show
how much of the reaction is the tick. Target: reaction under 3 s.

Prints a table and writes ``bench/results/reaction.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.table import Table

from decisions.fleetview import ReplicaState
from providers.local import LocalProvider
from scheduler.auth import add_token
from scheduler.config import SchedulerConfig
from scheduler.server import Scheduler
from spillway.demo_setup import AWS_ENV, RUNTIME, Services, start_services, upload_weights
from spillway.serve.control_plane import start_control_plane
from workflows.deployment import workflow_id
from workflows.sweeper import SWEEPER_ID

RESULTS = Path(__file__).resolve().parent / "results" / "reaction.json"
REPORT_INTERVAL_S = 1.0
WINDOW_S = 1.0
TARGET = 2
ARGS = ["--warmup-s", "0.5", "--max-running-requests", "2"]


def policy(name: str) -> dict[str, Any]:
    return {
        "credentials": {"aws": {"env": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]}},
        "deployments": {
            name: {
                "model": "llama-3.1-70b",
                "weights": "s3://demo-models/llama-3.1-70b/",
                "runtime": "simulated",
                "runtime_args": ARGS,
                "sku": "H100-80GB",
                "gpus": 8,
                "pools": [f"pool-{name}"],
                "min_replicas": 1,
                "max_replicas": 2,
                "autoscaling": {"target": TARGET, "scale_down_below": 0.5, "max_step_up": 1},
                "spillover": {
                    "enabled": True,
                    "providers": ["aws"],
                    "residency": "eu",
                    "max_spilled_replicas": 1,
                    "scale_up_window_s": WINDOW_S,
                    "cool_down_s": 3600,
                },
            }
        },
    }


def write_files(
    root: Path, name: str, services: Services, decide_every_s: float
) -> SchedulerConfig:
    """The run's policy, tokens and scheduler config."""
    root.mkdir()
    (root / "policy.yaml").write_text(yaml.safe_dump(policy(name)))
    tokens = root / "tokens.yaml"
    add_token(tokens, "bench", "operator")
    return SchedulerConfig.model_validate(
        {
            "listen": "127.0.0.1:0",
            "metrics_listen": None,
            "tokens_file": tokens,
            "report_interval_s": REPORT_INTERVAL_S,
            "policy_file": root / "policy.yaml",
            "temporal": {
                "address": services.temporal_address,
                "task_queue": f"control-{name}",
            },
            "spill": {
                "decide_every_s": decide_every_s,
                "weights_dir": str(root / "weights"),
                "weights_endpoint_url": services.moto_url,
                "heartbeat_timeout_s": 5,
                "sweep_every_s": 30,
            },
            "clouds": {"aws": {"image": "ami-12c6146b", "endpoint_url": services.moto_url}},
            "stand_in": {
                "state_dir": str(root / "machines"),
                "agent_settings": {
                    "runtime": RUNTIME,
                    "temporal": {"address": services.temporal_address},
                    "reconnect": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0},
                },
            },
        }
    )


def start_agent(root: Path, name: str, address: str, services: Services) -> subprocess.Popen[bytes]:
    """The reserved agent, its only replica on all eight GPUs."""
    agent = root / "agent.yaml"
    (root / "agent.token").write_text(add_token(root / "tokens.yaml", "reserved", "agent") + "\n")
    seed = root / "seed"
    seed.mkdir()
    agent.write_text(
        yaml.safe_dump(
            {
                "agent_id": "reserved",
                "scheduler": {"address": address, "token_file": str(root / "agent.token")},
                "labels": {"pool": f"pool-{name}", "provider": "onprem", "region": "fra"},
                "gpus": {
                    "discovery": "static",
                    "static": [{"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": 8}],
                },
                "state_dir": str(root / "agent-state"),
                "runtime": RUNTIME,
                "temporal": {"address": services.temporal_address},
                "replicas": [
                    {
                        "replica_id": "seed",
                        "deployment": name,
                        "model_path": str(seed),
                        "gpus": list(range(8)),
                        "extra_args": ARGS,
                    }
                ],
            }
        )
    )
    log = (root / "agent.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "spillway", "agent", "run", "--config", str(agent)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **AWS_ENV},
    )
    return process


async def one_run(root: Path, services: Services, decide_every_s: float) -> dict[str, float]:
    name = f"bench-{uuid.uuid4().hex[:6]}"
    config = await asyncio.to_thread(write_files, root, name, services, decide_every_s)
    scheduler = Scheduler(config)
    await scheduler.start()
    address = f"127.0.0.1:{scheduler.port}"
    launches: list[float] = []
    host, _store = await start_control_plane(
        config, scheduler.fleet, address, on_launch=lambda *_: launches.append(time.time())
    )
    process = await asyncio.to_thread(start_agent, root, name, address, services)
    clients: list[asyncio.Task[None]] = []
    try:
        port = await _wait_for(lambda: _replica_port(scheduler, name, rented=False), 60)
        clients = [asyncio.create_task(_client(port)) for _ in range(10)]
        saturated = await _wait_for(lambda: _saturated_at(scheduler, name), 60)
        serving = await _wait_for(lambda: _rented_healthy_at(scheduler, name), 90)
        return {
            "reaction_s": launches[0] - saturated,
            "launch_to_serving_s": serving - launches[0],
        }
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        for wid in (workflow_id(name), SWEEPER_ID):
            with contextlib.suppress(Exception):
                await host.client.get_workflow_handle(wid).terminate("benchmark run over")
        await host.stop()
        process.terminate()
        process.wait(20)
        local = LocalProvider(root / "machines", address, lambda _: "")
        for provider in host.plane.providers.values():
            for instance in provider.list_managed():
                provider.terminate(instance.key)
        for instance in local.list_managed():
            local.terminate(instance.key)
        await scheduler.stop(grace=0)


async def _wait_for(probe: Any, within_s: float) -> Any:
    deadline = time.monotonic() + within_s
    while (found := probe()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{probe} not met within {within_s}s")
        await asyncio.sleep(0.01)
    return found


def _replica_port(scheduler: Scheduler, name: str, rented: bool) -> int | None:
    for record, _ in scheduler.fleet.agents():
        is_rented = "spillway-key" in record.registration.labels.extra
        for r in record.report.replicas if record.report else ():
            if r.deployment == name and r.state is ReplicaState.HEALTHY and is_rented == rented:
                return r.port
    return None


def _saturated_at(scheduler: Scheduler, name: str) -> float | None:
    """Arrival time of the first report showing the queue over the target."""
    for record, _ in scheduler.fleet.agents():
        for r in record.report.replicas if record.report else ():
            if r.deployment == name and r.load.queued_requests > TARGET:
                return record.last_report_at
    return None


def _rented_healthy_at(scheduler: Scheduler, name: str) -> float | None:
    for record, _ in scheduler.fleet.agents():
        if "spillway-key" not in record.registration.labels.extra or record.report is None:
            continue
        for r in record.report.replicas:
            if r.deployment == name and r.state is ReplicaState.HEALTHY:
                return record.last_report_at
    return None


async def _client(port: int) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        while True:
            try:
                await http.post(
                    f"http://127.0.0.1:{port}/generate",
                    json={"text": "hello " * 50, "sampling_params": {"max_new_tokens": 128}},
                )
            except httpx.HTTPError:
                await asyncio.sleep(0.1)


def _summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return statistics.median(ordered), p90


async def main_async(runs: int) -> dict[str, Any]:
    console = Console()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="spillway-reaction-") as tmp:
        root = Path(tmp)
        services = start_services(root)
        try:
            upload_weights(services.moto_url)
            for i in range(runs):
                for tick in (REPORT_INTERVAL_S, 0.25):
                    os.environ.update(AWS_ENV)
                    measured = await one_run(root / f"run-{i}-{tick}", services, tick)
                    results.append({"run": i, "decide_every_s": tick, **measured})
                    console.print(
                        f"run {i} tick {tick:g}s: reaction {measured['reaction_s']:.2f}s, "
                        f"launch to serving {measured['launch_to_serving_s']:.2f}s"
                    )
        finally:
            services.stop()
    table = Table(title=f"Reaction time ({runs} runs each; reports every 1 s, window 1 s)")
    for column in ("tick", "statistic", "reaction s", "launch -> serving s", "target"):
        table.add_column(column, justify="right")
    summary: dict[str, Any] = {}
    for tick in (REPORT_INTERVAL_S, 0.25):
        rows = [r for r in results if r["decide_every_s"] == tick]
        react = _summary([r["reaction_s"] for r in rows])
        serve = _summary([r["launch_to_serving_s"] for r in rows])
        summary[f"tick_{tick:g}s"] = {
            "reaction_median_s": react[0],
            "reaction_p90_s": react[1],
            "launch_to_serving_median_s": serve[0],
            "launch_to_serving_p90_s": serve[1],
        }
        for label, k in (("median", 0), ("p90", 1)):
            table.add_row(
                f"{tick:g}s", label, f"{react[k]:.2f}", f"{serve[k]:.2f}", "reaction < 3 s"
            )
    console.print(table)
    return {
        "cpus": os.cpu_count(),
        "report_interval_s": REPORT_INTERVAL_S,
        "scale_up_window_s": WINDOW_S,
        "runs": results,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="runs per tick setting")
    args = parser.parse_args()
    data = asyncio.run(main_async(args.runs))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
