"""``spillway demo``: a burst spills out to rented GPUs inside the residency lock, and back.

Everything runs as real processes on loopback: a Temporal dev server, EC2 and S3 (moto), the
same ``spillway scheduler run`` and ``spillway agent run`` an operator starts, and a machine
"rented" from the local EC2 is stood in for by a local agent process with that machine's labels
(see :mod:`providers.standin`). Both deployments run on the ``simulated`` runtime, a real HTTP
server speaking SGLang's API.

The run has three phases, shown live with the fleet table and the workflows' own account of
what they did and why:

1. warm-up: the reserved replicas come up;
2. burst: chat clients saturate them; ``summarize`` first fills the free reserved GPU, then both
   deployments rent machines (``chat-eu`` only inside ``eu``), prefetch the weights from S3 onto
   them and serve;
3. calm: the clients stop; after the cool-down the rented replicas are drained and their
   machines terminated, and the reserved replicas stay.

Set-up (files, services, the policy) lives in :mod:`spillway.demo_setup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.channel import read_token
from common.v1 import agent_pb2 as pb
from spillway.demo_setup import (
    AWS_ENV,
    DemoFiles,
    Services,
    local_aws,
    start_services,
    upload_weights,
    write_demo_files,
)
from spillway.status import fetch_fleet, render

CLIENTS = {"chat-eu": 30, "summarize": 14}
#: How long rented replicas serve the burst before the load stops.
SERVE_S = 8.0


class Processes:
    """Child processes of the demo, each logging to its own file, all stopped on exit."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(
            [sys.executable, "-m", "spillway", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )

    def stop(self, name: str, timeout: float = 15.0) -> int | None:
        proc = self.running.pop(name, None)
        if proc is None:
            return None
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> dict[str, int | None]:
        return {name: self.stop(name) for name in list(self.running)}


@dataclass
class Traffic:
    """Where the chat clients send requests, and how many were answered."""

    targets: dict[str, list[str]] = field(default_factory=dict)
    sent: int = 0
    done: int = 0
    refused: int = 0


async def _chat_client(deployment: str, n: int, traffic: Traffic) -> None:
    """One user: a chat request to one of the deployment's replicas, wait, and again."""
    import httpx

    lengths = itertools.cycle((48, 96, 160, 64, 128, 224))
    async with httpx.AsyncClient(timeout=60) as http:
        for i in itertools.count(n):
            urls = traffic.targets.get(deployment) or []
            if not urls:
                await asyncio.sleep(0.2)
                continue
            body = {
                "messages": [{"role": "user", "content": "Summarise the news. " * 20}],
                "max_tokens": next(lengths),
            }
            traffic.sent += 1
            try:
                response = await http.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                traffic.done += 1
            else:
                traffic.refused += 1
                await asyncio.sleep(0.3)


@dataclass
class Watch:
    """What the demo has seen so far."""

    phase: str = "warm-up: starting the scheduler, two reserved agents and their replicas"
    spilled_at: dict[str, float] = field(default_factory=dict)
    rented_seen: set[str] = field(default_factory=set)
    events: dict[str, list[str]] = field(default_factory=dict)
    machines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _replicas(fleet: pb.GetFleetResponse) -> list[tuple[pb.AgentStatus, pb.Replica]]:
    return [(a, r) for a in fleet.agents for r in a.last_report.replicas]


def _is_rented(agent: pb.AgentStatus) -> bool:
    """An agent on a rented machine that still reports (a stopped one lingers as stale)."""
    return (
        "spillway-key" in agent.registration.labels.extra
        and agent.health == pb.AGENT_HEALTH_CONNECTED
    )


def _live_machines(moto_url: str) -> list[str]:
    """The managed EC2 machines that are not terminated, as table lines."""
    out = []
    for region in ("eu-north-1", "eu-south-2", "eu-central-1", "us-east-1", "us-east-2"):
        ec2 = local_aws("ec2", moto_url, region)
        for reservation in ec2.describe_instances()["Reservations"]:
            for i in reservation["Instances"]:
                if i["State"]["Name"] in ("terminated", "shutting-down"):
                    continue
                tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
                out.append(
                    f"{i['InstanceId']}  {i['InstanceType']:<14} {region:<13} "
                    f"{i['State']['Name']:<8} for {tags.get('spillway-deployment', '?')}"
                )
    return out


async def _observe(
    files: DemoFiles, services: Services, token: str, client: Any, watch: Watch, t: Traffic
) -> pb.GetFleetResponse:
    fleet = await fetch_fleet(files.address, token, None, deadline_s=5.0)
    targets: dict[str, list[str]] = {}
    for agent, replica in _replicas(fleet):
        if replica.state == pb.REPLICA_STATE_HEALTHY:
            targets.setdefault(replica.deployment, []).append(f"http://127.0.0.1:{replica.port}")
            if _is_rented(agent):
                watch.rented_seen.add(replica.deployment)
                watch.spilled_at.setdefault(replica.deployment, time.monotonic())
    t.targets = targets
    for name in CLIENTS:
        with contextlib.suppress(Exception):
            state = await client.get_workflow_handle(f"deployment-{name}").query("state")
            watch.events[name] = list(state.get("recent", []))[-7:]
    watch.machines = await asyncio.to_thread(_live_machines, services.moto_url)
    return fleet


def _view(fleet: pb.GetFleetResponse, watch: Watch, traffic: Traffic, ui: str) -> Group:
    events = Table(title="What the deployment workflows did, and why", expand=True)
    events.add_column("deployment", no_wrap=True)
    events.add_column("newest events (Temporal query `state`)")
    for name in CLIENTS:
        lines = [line[:160] for line in watch.events.get(name, [])]
        events.add_row(name, "\n".join(lines) or "-")
    machines = "\n".join(watch.machines) or "none"
    caption = Text(
        f"{watch.phase}\n"
        f"rented machines (local EC2):\n{machines}\n"
        f"chat requests: {traffic.sent} sent, {traffic.done} answered, {traffic.refused} "
        f"refused or retried\nTemporal UI: {ui}",
        style="dim",
    )
    return Group(render(fleet), events, caption)


async def _run(files: DemoFiles, services: Services, procs: Processes, console: Console) -> int:
    from temporalio.client import Client

    token = read_token(files.operator_token)
    procs.start("scheduler", "scheduler", "run", "--config", str(files.scheduler_config))
    for agent_id, path in files.agent_configs.items():
        procs.start(agent_id, "agent", "run", "--config", str(path))
    client = await Client.connect(services.temporal_address)
    watch = Watch()
    traffic = Traffic()
    clients: list[asyncio.Task[None]] = []
    start = time.monotonic()
    phase_start = start
    stage = "warm-up"
    fleet = pb.GetFleetResponse()
    with Live(console=console, auto_refresh=False) as live:
        while True:
            now = time.monotonic()
            try:
                fleet = await _observe(files, services, token, client, watch, traffic)
            except Exception as exc:  # the scheduler is still starting, or busy: try again
                watch.errors.append(f"{type(exc).__name__}")
            seeds = {
                r.deployment for _, r in _replicas(fleet) if r.state == pb.REPLICA_STATE_HEALTHY
            }
            if stage == "warm-up" and set(CLIENTS) <= seeds:
                stage, phase_start = "burst", now
                watch.phase = (
                    f"burst: {sum(CLIENTS.values())} chat clients saturate the reserved replicas"
                )
                clients = [
                    asyncio.create_task(_chat_client(name, i, traffic))
                    for name, count in CLIENTS.items()
                    for i in range(count)
                ]
            elif stage == "burst":
                served = [
                    now - watch.spilled_at[n] >= SERVE_S for n in CLIENTS if n in watch.spilled_at
                ]
                if (len(served) == len(CLIENTS) and all(served)) or now - phase_start > 90:
                    stage, phase_start = "calm", now
                    watch.phase = (
                        "calm: the clients stopped; after the cool-down the rented "
                        "replicas drain and their machines are given back"
                    )
                    for task in clients:
                        task.cancel()
                    await asyncio.gather(*clients, return_exceptions=True)
            elif stage == "calm":
                rented = [a for a, _ in _replicas(fleet) if _is_rented(a)]
                if (not rented and not watch.machines) or now - phase_start > 75:
                    stage = "done"
            if stage == "warm-up" and now - start > 60:
                watch.errors.append("the reserved replicas did not come up within 60s")
                stage = "done"
            live.update(_view(fleet, watch, traffic, services.temporal_ui), refresh=True)
            if stage == "done":
                break
            await asyncio.sleep(0.5)
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    elapsed = time.monotonic() - start
    console.print("\nWhat each deployment workflow did (Temporal query `state`):")
    for name in CLIENTS:
        with contextlib.suppress(Exception):
            state = await client.get_workflow_handle(f"deployment-{name}").query("state")
            console.print(f"[bold]{name}[/bold]")
            for line in state.get("recent", []):
                console.print(f"  {line}", soft_wrap=True)
    out = watch.rented_seen == set(CLIENTS)
    back = not watch.machines
    console.print(
        f"\nspilled out: {', '.join(sorted(watch.rented_seen)) or 'nothing'}; "
        f"rented machines left: {len(watch.machines)}; {elapsed:.0f}s"
    )
    return 0 if out and back else 1


def _stop_stand_ins(files: DemoFiles) -> None:
    """Rented machines' stand-in agents run on after the scheduler; stop any left."""
    from providers.local import LocalProvider

    local = LocalProvider(files.machines, files.address, lambda _: "")
    for instance in local.list_managed():
        local.terminate(instance.key)


def run_demo(seconds: float = 240.0) -> int:
    """Run the demo; ``seconds`` bounds the whole run."""
    for noisy in ("httpx", "werkzeug", "botocore", "temporalio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    with tempfile.TemporaryDirectory(prefix="spillway-demo-") as tmp:
        root = Path(tmp)
        console.print("starting a Temporal dev server and a local EC2 and S3 (moto) ...")
        services = start_services(root)
        procs: Processes | None = None
        code = 1
        try:
            upload_weights(services.moto_url)
            files = write_demo_files(root, services)
            procs = Processes(root, {**os.environ, **AWS_ENV})
            console.print(f"Temporal UI: {services.temporal_ui} (while the demo runs)")
            code = asyncio.run(asyncio.wait_for(_run(files, services, procs, console), seconds))
        except TimeoutError:
            console.print(f"[red]the demo did not finish within {seconds:.0f}s[/red]")
        finally:
            exits = procs.stop_all() if procs is not None else {}
            with contextlib.suppress(Exception):
                _stop_stand_ins(files)
            services.stop()
        with contextlib.suppress(OSError):
            console.print(
                f"stopped cleanly: {', '.join(f'{n} exit {c}' for n, c in exits.items())}, "
                "Temporal and moto"
            )
        if code != 0:
            console.print("[red]the demo did not see the spill out and back; logs follow[/red]")
            for log in sorted([*root.glob("*.log"), *root.glob("machines/*.log")]):
                console.print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        return code
