"""``spillway demo``: a burst spills out to rented GPUs inside the residency lock, and back.

Everything runs as real processes on loopback: a Temporal dev server, EC2 and S3 (moto), the
same ``spillway scheduler run`` and ``spillway agent run`` an operator starts, and a machine
"rented" from the local EC2 is stood in for by a local agent process with that machine's labels
(see :mod:`providers.standin`). Both deployments run on the ``simulated`` runtime, a real HTTP
server speaking SGLang's API.

All chat traffic goes to the gateway (``spillway gateway run``), the one OpenAI-compatible
endpoint applications call; its URL is printed first, as ``gateway: http://127.0.0.1:PORT/v1``.
Each deployment has a managed endpoint inside its lock: a simulated server standing in for a
hosted API, with a per-token price.

The run has three phases, shown live with the fleet table, the workflows' own account of what
they did and why, and a timeline of what the gateway did with the requests:

1. warm-up: the reserved replicas come up;
2. burst: chat clients fill the reserved replicas; the gateway sends the overflow to the
   managed endpoints at once, and the deployments scale up: ``summarize`` first fills the free
   reserved GPU, then both rent machines (``chat-eu`` only inside ``eu``),
   prefetch the weights from S3 onto them and serve; as rented replicas join, the managed
   overflow falls back;
3. calm: the clients stop; after the cool-down the rented replicas are drained through the
   gateway (no new requests, in-flight ones finish) and their machines terminated; the
   reserved replicas stay.

It ends with one line: ``requests: N sent, N answered (R reserved, S rented, M managed), 0
lost`` (lost: sent, and neither answered nor refused with a status).

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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common.schedulerlink import read_token
from common.v1 import agent_pb2 as pb
from spillway.demo_setup import (
    AWS_ENV,
    MANAGED,
    DemoFiles,
    Services,
    local_aws,
    start_services,
    upload_weights,
    write_demo_files,
)
from spillway.status import fetch_fleet, render

#: Chat clients per deployment: each sends a request, waits for the answer, and sends again.
CLIENTS = {"chat-eu": 12, "summarize": 11}
#: The served model name of each deployment (what clients put in ``model``).
MODELS = {"chat-eu": "llama-3.1-70b", "summarize": "llama-3.1-8b"}
#: How long rented replicas serve the burst before the load stops.
SERVE_S = 8.0


class Processes:
    """Child processes of the demo, each logging to its own file, all stopped on exit."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, module: str = "spillway") -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(
            [sys.executable, "-m", module, *args],
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
    """What the chat clients sent to the gateway and what became of it."""

    gateway_url: str = ""
    sent: int = 0
    #: Answered requests by deployment and tier (the gateway's ``x-spillway-tier`` header).
    answered: dict[str, Counter[str]] = field(default_factory=dict)
    #: Refused with a status (429 or 503 with Retry-After): the client was told, and retries.
    refused: int = 0
    #: When each deployment's newest answer from each tier came.
    last: dict[tuple[str, str], float] = field(default_factory=dict)
    #: Set when the burst ends: each client finishes the request it has in flight and stops.
    stopping: bool = False

    def total(self, tier: str) -> int:
        return sum(c[tier] for c in self.answered.values())

    @property
    def done(self) -> int:
        return sum(sum(c.values()) for c in self.answered.values())

    def line(self, in_flight: int = 0) -> str:
        lost = self.sent - self.done - self.refused - in_flight
        return (
            f"requests: {self.sent} sent, {self.done} answered ({self.total('reserved')} "
            f"reserved, {self.total('rented')} rented, {self.total('managed')} managed), "
            f"{lost} lost"
        )


async def _chat_client(deployment: str, n: int, traffic: Traffic, busy: list[int]) -> None:
    """One user of the gateway: a chat request, wait for the answer, and again."""
    import httpx

    lengths = itertools.cycle((48, 96, 160, 64, 128, 224))
    answered = traffic.answered.setdefault(deployment, Counter())
    async with httpx.AsyncClient(timeout=60) as http:
        while not traffic.stopping:
            body = {
                "model": MODELS[deployment],
                "messages": [{"role": "user", "content": "Summarise the news. " * 20}],
                "max_tokens": next(lengths),
                "user": f"{deployment}-user-{n}",
            }
            traffic.sent += 1
            busy[0] += 1
            try:
                response = await http.post(f"{traffic.gateway_url}/chat/completions", json=body)
            except httpx.HTTPError:
                await asyncio.sleep(0.3)  # counted as lost: neither answered nor refused
                continue
            finally:
                busy[0] -= 1
            if response.status_code == 200:
                tier = response.headers.get("x-spillway-tier", "?")
                answered[tier] += 1
                traffic.last[(deployment, tier)] = time.monotonic()
            else:
                traffic.refused += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))


@dataclass
class Watch:
    """What the demo has seen so far."""

    phase: str = "warm-up: starting the scheduler, two reserved agents and their replicas"
    spilled_at: dict[str, float] = field(default_factory=dict)
    rented_seen: set[str] = field(default_factory=set)
    events: dict[str, list[str]] = field(default_factory=dict)
    machines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: What happened to the traffic, in order, once each: (seconds since the burst, line).
    timeline: list[tuple[float, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def mark(self, key: str, at: float, text: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.timeline.append((at, text))


def _follow(watch: Watch, traffic: Traffic, burst_at: float, now: float) -> None:
    """Add what the gateway's answers show to the timeline, per deployment, in the order the
    story must happen: reserved full and managed overflow, rented joining, managed falling
    back (no managed answer for 2 s while rented ones come)."""
    at = now - burst_at
    for name in CLIENTS:
        counts = traffic.answered.get(name, Counter())
        endpoint, _, price, _ = MANAGED[name]
        if counts["managed"]:
            watch.mark(
                f"{name}/managed",
                at,
                f"{name}: reserved replicas full; overflow served by the managed endpoint "
                f"{endpoint} (${price:.2f} per million tokens)",
            )
        if counts["rented"] and f"{name}/managed" in watch.seen:
            watch.mark(f"{name}/rented", at, f"{name}: a rented replica joined and serves")
        managed_at = traffic.last.get((name, "managed"), 0.0)
        rented_at = traffic.last.get((name, "rented"), 0.0)
        if f"{name}/rented" in watch.seen and now - managed_at > 2 and now - rented_at < 1:
            watch.mark(
                f"{name}/back",
                at,
                f"{name}: managed overflow fell back (no request sent there for 2 s)",
            )


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
    files: DemoFiles, services: Services, token: str, client: Any, watch: Watch
) -> pb.GetFleetResponse:
    fleet = await fetch_fleet(files.address, token, None, deadline_s=5.0)
    for agent, replica in _replicas(fleet):
        if replica.state == pb.REPLICA_STATE_HEALTHY and _is_rented(agent):
            watch.rented_seen.add(replica.deployment)
            watch.spilled_at.setdefault(replica.deployment, time.monotonic())
    for name in CLIENTS:
        with contextlib.suppress(Exception):
            state = await client.get_workflow_handle(f"deployment-{name}").query("state")
            watch.events[name] = list(state.get("recent", []))[-7:]
    watch.machines = await asyncio.to_thread(_live_machines, services.moto_url)
    return fleet


def _view(fleet: pb.GetFleetResponse, watch: Watch, traffic: Traffic, busy: int, ui: str) -> Group:
    events = Table(title="What the deployment workflows did, and why", expand=True)
    events.add_column("deployment", no_wrap=True)
    events.add_column("newest events (Temporal query `state`)")
    for name in CLIENTS:
        lines = [line[:160] for line in watch.events.get(name, [])]
        events.add_row(name, "\n".join(lines) or "-")
    machines = "\n".join(watch.machines) or "none"
    timeline = "\n".join(f"  +{at:5.1f}s  {text}" for at, text in watch.timeline) or "  -"
    caption = Text(
        f"{watch.phase}\n"
        f"what the gateway did with the traffic:\n{timeline}\n"
        f"rented machines (local EC2):\n{machines}\n"
        f"{traffic.line(busy)} ({traffic.refused} refused with Retry-After, {busy} in flight)\n"
        f"gateway: {traffic.gateway_url}   Temporal UI: {ui}",
        style="dim",
    )
    return Group(render(fleet), events, caption)


def _start_managed(files: DemoFiles, procs: Processes) -> None:
    """The stand-ins for the hosted APIs: simulated servers serving each deployment's model."""
    model = files.root / "models" / "hosted"
    model.mkdir(parents=True, exist_ok=True)
    for name, (port, served) in files.managed.items():
        endpoint, _, _, cap = MANAGED[name]
        procs.start(
            endpoint,
            *("--model-path", str(model), "--served-model-name", served, "--port", str(port)),
            *("--max-running-requests", str(cap), "--warmup-s", "0", "--enable-metrics"),
            module="agent.runtimes.simulated_server",
        )


async def _wait_http(url: str, within_s: float) -> bool:
    import httpx

    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(timeout=1) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return True
            await asyncio.sleep(0.2)
    return False


async def _run(files: DemoFiles, services: Services, procs: Processes, console: Console) -> int:
    from temporalio.client import Client

    token = read_token(files.operator_token)
    procs.start("scheduler", "scheduler", "run", "--config", str(files.scheduler_config))
    for agent_id, path in files.agent_configs.items():
        procs.start(agent_id, "agent", "run", "--config", str(path))
    _start_managed(files, procs)
    procs.start("gateway", "gateway", "run", "--config", str(files.gateway_config))
    client = await Client.connect(services.temporal_address)
    watch = Watch()
    traffic = Traffic(gateway_url=files.gateway_url)
    busy = [0]
    clients: list[asyncio.Task[None]] = []
    start = time.monotonic()
    phase_start = burst_at = start
    stage = "warm-up"
    fleet = pb.GetFleetResponse()
    with Live(console=console, auto_refresh=False) as live:
        while True:
            now = time.monotonic()
            try:
                fleet = await _observe(files, services, token, client, watch)
            except Exception as exc:  # the scheduler is still starting, or busy: try again
                watch.errors.append(f"{type(exc).__name__}")
            seeds = {
                r.deployment for _, r in _replicas(fleet) if r.state == pb.REPLICA_STATE_HEALTHY
            }
            if stage == "warm-up" and set(CLIENTS) <= seeds:
                if not await _wait_http(files.gateway_url.removesuffix("/v1") + "/health", 30):
                    watch.errors.append("the gateway did not answer /health within 30s")
                    stage = "done"
                else:
                    stage, phase_start = "burst", now
                    burst_at = now
                    watch.phase = (
                        f"burst: {sum(CLIENTS.values())} chat clients call the gateway; the "
                        "reserved replicas fill up"
                    )
                    clients = [
                        asyncio.create_task(_chat_client(name, i, traffic, busy))
                        for name, count in CLIENTS.items()
                        for i in range(count)
                    ]
            elif stage == "burst":
                _follow(watch, traffic, burst_at, now)
                served = [
                    now - watch.spilled_at[n] >= SERVE_S for n in CLIENTS if n in watch.spilled_at
                ]
                fell_back = all(f"{n}/back" in watch.seen for n in CLIENTS)
                if (len(served) == len(CLIENTS) and all(served) and fell_back) or (
                    now - phase_start > 120
                ):
                    stage, phase_start = "calm", now
                    watch.phase = (
                        "calm: the clients stopped; after the cool-down the rented replicas "
                        "drain through the gateway and their machines are given back"
                    )
                    traffic.stopping = True  # each finishes what it has in flight
                    await asyncio.wait(clients, timeout=60)
            elif stage == "calm":
                rented = [a for a, _ in _replicas(fleet) if _is_rented(a)]
                if (not rented and not watch.machines) or now - phase_start > 75:
                    if not rented and not watch.machines:
                        watch.mark(
                            "released",
                            now - burst_at,
                            "rented replicas drained through the gateway; machines terminated",
                        )
                    stage = "done"
            if stage == "warm-up" and now - start > 60:
                watch.errors.append("the reserved replicas did not come up within 60s")
                stage = "done"
            live.update(_view(fleet, watch, traffic, busy[0], services.temporal_ui), refresh=True)
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
    console.print("\nWhat the gateway did with the traffic:")
    for at, text in watch.timeline:
        console.print(f"  +{at:5.1f}s  {text}")
    out = watch.rented_seen == set(CLIENTS)
    back = not watch.machines
    story = [f"{n}/{step}" for n in CLIENTS for step in ("managed", "rented", "back")]
    told = all(key in watch.seen for key in [*story, "released"])
    console.print(
        f"\nspilled out: {', '.join(sorted(watch.rented_seen)) or 'nothing'}; "
        f"rented machines left: {len(watch.machines)}; {elapsed:.0f}s"
    )
    line = traffic.line()
    console.print(line)
    lost = traffic.sent - traffic.done - traffic.refused
    return 0 if out and back and told and lost == 0 else 1


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
            console.print(f"gateway: {files.gateway_url}")
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
