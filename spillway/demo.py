"""``spillway demo``: a scheduler and two agents on loopback, and the fleet table updating live.

Everything runs as real processes talking real gRPC: the same ``spillway scheduler run`` and
``spillway agent run`` an operator would start, with tokens and config files written to a
temporary directory. Half-way through, one agent is stopped (it turns stale) and started again
(it re-registers), so the table shows the scheduler following the fleet.

Each agent runs one replica of the ``simulated`` runtime (a real HTTP server speaking SGLang's
API, paced like the agent's GPU model), and the demo sends it a modest stream of chat requests,
so the replica table shows running and queued requests, KV-cache use and tokens/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from agent.channel import read_token
from scheduler.auth import add_token
from spillway.status import fetch_fleet, render

REPORT_INTERVAL_S = 1.0
CLIENTS_PER_REPLICA = 12  # concurrent chat clients: more than the replica runs at once
MAX_RUNNING_REQUESTS = 8

AGENTS: dict[str, dict[str, Any]] = {
    "reserved-eu-1": {
        "labels": {
            "pool": "reserved-eu",
            "provider": "onprem",
            "region": "eu-frankfurt",
            "zone": "rack-a",
            "residency_group": "eu",
        },
        "gpus": {
            "discovery": "static",
            "static": [{"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": 8}],
        },
    },
    "reserved-us-1": {
        "labels": {
            "pool": "reserved-us",
            "provider": "aws",
            "region": "us-east-1",
            "zone": "us-east-1a",
            "residency_group": "us",
            "instance_id": "i-0demo",
        },
        "gpus": {
            "discovery": "static",
            "static": [{"model": "NVIDIA L40S", "memory_gib": 48, "count": 4}],
        },
    },
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class DemoFiles:
    root: Path
    scheduler_config: Path
    agent_configs: dict[str, Path]
    operator_token: Path
    address: str
    replica_urls: dict[str, str]


def write_demo_files(root: Path) -> DemoFiles:
    """Tokens, a scheduler config and one config per agent, as an operator would write them."""
    tokens = root / "tokens.yaml"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    scheduler_config = root / "scheduler.yaml"
    scheduler_config.write_text(
        yaml.safe_dump(
            {
                "listen": address,
                "metrics_listen": f"127.0.0.1:{_free_port()}",
                "tokens_file": tokens.name,
                "report_interval_s": REPORT_INTERVAL_S,
                "stale_after_intervals": 3,
                "gone_after_intervals": 30,
            }
        )
    )
    operator_token = root / "operator.token"
    operator_token.write_text(add_token(tokens, "demo-operator", "operator") + "\n")
    configs: dict[str, Path] = {}
    urls: dict[str, str] = {}
    model = root / "models" / "llama-3.1-8b-instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    for agent_id, spec in AGENTS.items():
        token_file = root / f"{agent_id}.token"
        token_file.write_text(add_token(tokens, agent_id, "agent") + "\n")
        replica_port = _free_port()
        urls[agent_id] = f"http://127.0.0.1:{replica_port}"
        config = {
            "agent_id": agent_id,
            "scheduler": {"address": address, "token_file": token_file.name},
            "reconnect": {"initial_backoff_s": 0.2, "max_backoff_s": 2.0},
            "state_dir": f"{agent_id}-state",
            "runtime": {
                "default": "simulated",
                "host": "127.0.0.1",
                "health_interval_s": 0.25,
                "stop_timeout_s": 3,
                "on_exit": "stop",
            },
            "replicas": [
                {
                    "replica_id": f"{agent_id}-chat-0",
                    "deployment": "chat",
                    "model_path": str(model.relative_to(root)),
                    "served_model_name": "llama-3.1-8b",
                    "gpus": [0],
                    "port": replica_port,
                    "extra_args": [
                        "--warmup-s",
                        "0.5",
                        "--max-running-requests",
                        str(MAX_RUNNING_REQUESTS),
                    ],
                }
            ],
            **spec,
        }
        path = root / f"{agent_id}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        configs[agent_id] = path
    return DemoFiles(root, scheduler_config, configs, operator_token, address, urls)


class Processes:
    """Child processes of the demo, each logging to its own file, all stopped on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(
            [sys.executable, "-m", "spillway", *args], stdout=log, stderr=subprocess.STDOUT
        )

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
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


async def _wait_for_scheduler(address: str, token: str, deadline: float) -> None:
    import grpc

    while True:
        try:
            await fetch_fleet(address, token, None, deadline_s=1.0)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@dataclass
class Load:
    """Counts of the chat requests the demo sends to the replicas."""

    sent: int = 0
    done: int = 0
    refused: int = 0  # replica not up (starting, or its agent stopped): tried again later


async def _chat_client(url: str, client_id: int, load: Load) -> None:
    """One user: a chat request, wait for the answer, and again; lengths vary per request."""
    import httpx

    lengths = itertools.cycle((48, 96, 160, 64, 128, 224))
    for _ in range(client_id):
        next(lengths)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while True:
            body = {
                "model": "llama-3.1-8b",
                "messages": [{"role": "user", "content": "Summarise the news. " * 20}],
                "max_tokens": next(lengths),
            }
            load.sent += 1
            try:
                response = await http.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 200:
                load.done += 1
            else:
                load.refused += 1
                await asyncio.sleep(0.5)


async def _run(files: DemoFiles, procs: Processes, seconds: float, console: Console) -> int:
    token = read_token(files.operator_token)
    procs.start("scheduler", "scheduler", "run", "--config", str(files.scheduler_config))
    await _wait_for_scheduler(files.address, token, time.monotonic() + 30)
    for agent_id, path in files.agent_configs.items():
        procs.start(agent_id, "agent", "run", "--config", str(path))

    victim = "reserved-us-1"
    timeline = [
        (0.35 * seconds, f"stopping agent {victim}: watch it turn stale", "stop"),
        (0.65 * seconds, f"starting agent {victim} again: it re-registers", "start"),
    ]
    events: list[str] = [
        f"started the scheduler and 2 agents, each running one simulated replica; "
        f"{CLIENTS_PER_REPLICA} chat clients per replica"
    ]
    load = Load()
    clients = [
        asyncio.create_task(_chat_client(url, i, load))
        for url in files.replica_urls.values()
        for i in range(CLIENTS_PER_REPLICA)
    ]
    try:
        return await _watch(files, procs, seconds, console, token, timeline, events, load)
    finally:
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)


async def _watch(
    files: DemoFiles,
    procs: Processes,
    seconds: float,
    console: Console,
    token: str,
    timeline: list[tuple[float, str, str]],
    events: list[str],
    load: Load,
) -> int:
    import grpc

    victim = "reserved-us-1"
    start = time.monotonic()
    seen_both = False
    with Live(console=console, auto_refresh=False) as live:
        while (elapsed := time.monotonic() - start) < seconds:
            while timeline and elapsed >= timeline[0][0]:
                _, message, action = timeline.pop(0)
                events.append(f"t={elapsed:4.1f}s  {message}")
                if action == "stop":  # off the event loop: the chat clients keep going
                    await asyncio.get_running_loop().run_in_executor(None, procs.stop, victim)
                else:
                    procs.start(
                        victim, "agent", "run", "--config", str(files.agent_configs[victim])
                    )
            try:
                fleet = await fetch_fleet(files.address, token, None, deadline_s=5.0)
            except grpc.aio.AioRpcError as exc:  # a busy machine: show the rest, try again
                events.append(f"t={elapsed:4.1f}s  the scheduler did not answer: {exc.code().name}")
                continue
            seen_both = seen_both or len(fleet.agents) == len(AGENTS)
            traffic = (
                f"chat requests: {load.sent} sent, {load.done} answered, "
                f"{load.refused} refused while a replica was down"
            )
            caption = Text("\n".join([*events, traffic]), style="dim")
            live.update(Group(render(fleet), caption), refresh=True)
            await asyncio.sleep(0.5)
    # On a slow machine the run can end before the victim was started again; start it anyway,
    # so the demo always ends with the whole fleet back and stops every agent the same way.
    if any(action == "start" for _, _, action in timeline) and victim not in procs.running:
        procs.start(victim, "agent", "run", "--config", str(files.agent_configs[victim]))
    return 0 if seen_both else 1


def run_demo(seconds: float = 20.0) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per chat request is noise
    console = Console() if sys.stdout.isatty() else Console(width=150)
    with tempfile.TemporaryDirectory(prefix="spillway-demo-") as tmp:
        root = Path(tmp)
        files = write_demo_files(root)
        procs = Processes(root)
        try:
            code = asyncio.run(_run(files, procs, seconds, console))
        finally:
            exits = procs.stop_all()
        with contextlib.suppress(OSError):
            console.print(
                f"\nstopped cleanly: {', '.join(f'{n} exit {c}' for n, c in exits.items())}"
            )
        if code != 0:
            console.print("[red]the fleet never showed both agents; logs follow[/red]")
            for log in sorted(root.glob("*.log")):
                console.print(f"--- {log.name}\n{log.read_text()}")
        return code
