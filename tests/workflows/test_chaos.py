"""Chaos: the scheduler process (which hosts the Temporal worker) is killed at every activity
boundary of a provision and started again. Every provision still ends serving, with exactly one
machine for its request and nothing leaked.

Six provisions run at once, each with its own crash point (before and after each control
activity: launch, wait for the agent, wait for the replica). "after" is the cruel one: the work
is done (the machine exists, the agent registered) but Temporal never hears of it, so the
activity runs again after a restart and must find what the first attempt made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client

from decisions.plantypes import OfferChoice, ReplicaTemplate, Timeouts
from providers.local import LocalProvider
from tests.conftest import Tokens, write_yaml
from tests.workflows.conftest import STAND_IN_RUNTIME, ec2_instances
from tests.workflows.test_spill import spill_policy, upload_weights
from workflows.deployment import workflow_id
from workflows.sweeper import SWEEPER_ID
from workflows.types import ProvisionInput, ProvisionResult

CRASH_POINTS = [
    "launch_instance:before",
    "launch_instance:after",
    "wait_for_agent:before",
    "wait_for_agent:after",
    "wait_for_replica:before",
    "wait_for_replica:after",
]
REGION = "eu-north-1"
OFFER = OfferChoice("aws", "p5.48xlarge", REGION, [f"{REGION}a", f"{REGION}b"], 57.79)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Restarter:
    """Keeps one scheduler process running; counts how often it died."""

    def __init__(self, config: Path, env: dict[str, str], log: Path) -> None:
        self.config = config
        self.env = env
        self.log = log.open("ab")
        self.deaths = 0
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.workflows.crashing_scheduler", str(self.config)],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def keep_alive(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self.process.poll() is not None:
                self.deaths += 1
                self.process = self._start()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def test_provision_survives_a_crash_at_every_activity_boundary(
    tmp_path: Path, tokens: Tokens, temporal_address: str, moto_server: str, aws_credentials: None
) -> None:
    suffix = uuid.uuid4().hex[:6]
    name = f"chaos-{suffix}"
    queue = f"chaos-{suffix}"
    weights = upload_weights(moto_server, f"chaos-{suffix}")
    policy = spill_policy(name, f"none-{suffix}", weights, max_spilled_replicas=8, cool_down_s=3600)
    policy["deployments"][name].update({"min_replicas": 0, "max_replicas": 8})
    write_yaml(tmp_path / "policy.yaml", policy)
    machines = tmp_path / "machines"
    config = write_yaml(
        tmp_path / "scheduler.yaml",
        {
            "listen": f"127.0.0.1:{free_port()}",
            "metrics_listen": None,
            "tokens_file": str(tokens.path),
            "report_interval_s": 0.25,
            "policy_file": "policy.yaml",
            "temporal": {"address": temporal_address, "task_queue": queue},
            "spill": {
                "weights_dir": str(tmp_path / "weights"),
                "weights_endpoint_url": moto_server,
                "heartbeat_timeout_s": 3,
                "sweep_every_s": 1,
                "leak_grace_s": 5,
            },
            "clouds": {"aws": {"image": "ami-12c6146b", "endpoint_url": moto_server}},
            "stand_in": {
                "state_dir": str(machines),
                "agent_settings": {
                    "runtime": STAND_IN_RUNTIME,
                    "temporal": {"address": temporal_address},
                    "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
                },
            },
        },
    )
    ids = [f"provision-{name}-{i}" for i in range(len(CRASH_POINTS))]
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    env = {
        **os.environ,
        "SPILLWAY_TEST_CRASHES": json.dumps(dict(zip(ids, CRASH_POINTS, strict=True))),
        "SPILLWAY_TEST_CRASH_DIR": str(crash_dir),
    }
    scheduler = Restarter(config, env, tmp_path / "scheduler.log")
    watcher = asyncio.create_task(scheduler.keep_alive())
    client = await Client.connect(temporal_address)
    template = ReplicaTemplate(
        name, "chat", weights, "simulated", ["--max-running-requests", "2"], "H100-80GB", 8
    )
    try:
        handles = [
            await client.start_workflow(
                "provision",
                ProvisionInput(
                    parent_id="",
                    replica_id=f"{name}-r{i}",
                    template=template,
                    where="cloud",
                    offers=[OFFER],
                    timeouts=Timeouts(register_s=90, prefetch_s=60, start_s=60, heartbeat_s=3),
                    weights_dir=str(tmp_path / "weights"),
                    weights_endpoint_url=moto_server,
                ),
                id=workflow_id,
                task_queue=queue,
                execution_timeout=timedelta(minutes=5),
                result_type=ProvisionResult,
            )
            for i, workflow_id in enumerate(ids)
        ]
        started = time.monotonic()
        results: list[ProvisionResult] = await asyncio.wait_for(
            asyncio.gather(*(h.result() for h in handles)),
            timeout=240,
        )
        elapsed = time.monotonic() - started
        failures = [(r.workflow_id, r.error, r.attempts) for r in results if not r.ok]
        assert failures == [], (failures, (tmp_path / "scheduler.log").read_text()[-4000:])
        # Every crash point fired, each in a process of its own.
        fired = sorted(p.read_text() for p in crash_dir.iterdir())
        assert fired == sorted(CRASH_POINTS)
        assert scheduler.deaths == len(CRASH_POINTS)
        # Exactly one machine per request: the one launched for the first offer.
        live = ec2_instances(moto_server, REGION, f"provision-{name}-")
        assert sorted(m["key"] for m in live) == sorted(f"{w}.0" for w in ids)
        stand_ins = LocalProvider(machines, "127.0.0.1:1", lambda _: "").list_managed()
        assert sorted(i.key for i in stand_ins) == sorted(f"{w}.0" for w in ids)
        for result in results:
            assert result.key == f"{result.workflow_id}.0"
            assert result.attempts[0] == f"{OFFER.describe()}: launched {_instance(live, result)}"
            assert result.attempts[-1] == f"{result.replica_id} serving on {result.agent_id}"
        print(f"six provisions with six crashes took {elapsed:.1f}s")
    finally:
        watcher.cancel()
        scheduler.stop()
        for wid in (SWEEPER_ID, workflow_id(name)):
            with contextlib.suppress(Exception):
                await client.get_workflow_handle(wid).terminate("test over")
        local = LocalProvider(machines, "127.0.0.1:1", lambda _: "")
        for instance in local.list_managed():
            local.terminate(instance.key)
        for machine in ec2_instances(moto_server, REGION, f"provision-{name}-"):
            _terminate(moto_server, machine["id"])


def _instance(live: list[dict[str, Any]], result: ProvisionResult) -> str:
    return str(next(m["id"] for m in live if m["key"] == result.key))


def _terminate(moto_server: str, instance_id: str) -> None:
    import boto3

    boto3.client("ec2", region_name=REGION, endpoint_url=moto_server).terminate_instances(
        InstanceIds=[instance_id]
    )
