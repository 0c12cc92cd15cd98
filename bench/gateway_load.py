"""Benchmark: Spillway's gateway against direct calls and SGLang's own router, on one machine.

Every configuration fronts the same simulated replicas (``agent.runtimes.simulated_server``,
with its prefix cache), in one run:

- ``direct``: the load generator spreads requests over the replicas itself (round robin);
- ``spillway``: ``spillway gateway run``, its fleet from a stand-in scheduler that streams the
  replicas over the real ``GatewayService`` contract;
- ``spillway-no-affinity``: the same gateway with ``gateway.affinity: false`` (least in flight);
- ``sglang-router``: ``python -m sglang_router.launch_router`` 0.3.2 with ``cache_aware``
  (throughput levels) and, for the table's last rows, its answer with zero workers.

Two workloads:

1. **Throughput and added latency**: C concurrent streams (64, 256, 1,024) of short streaming
   chat completions for a few seconds each; time to the first byte per request, requests per
   second, the proxy's CPU seconds per request and its peak memory (RSS, psutil).
2. **Multi-turn affinity**: many conversations of several turns that share a few long system
   prompts, each turn's prompt the whole conversation so far; prefix-cache hit rate (cached
   over prompt tokens, from the replicas' own counters), TTFT p50/p99, and the busiest
   replica's share over the mean.

The load generator runs in its own process (``--drive``). Prints tables and writes JSON under
``bench/results/``. Targets (issue: the gateway): hit rate at least sglang-router
``cache_aware``'s with no replica over 1.25x the mean load; added p99 under 5 ms at 256 streams;
throughput at least sglang-router's; memory under 200 MB at 1,024 streams. This file is a
benchmark, not a test: it asserts nothing.

    .venv/bin/python bench/gateway_load.py            # everything (a few minutes)
    .venv/bin/python bench/gateway_load.py --quick    # shorter levels
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench-model"
REPLICAS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers (sglang-router's /health is 503 with no worker)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer in {timeout_s:.0f}s")


@contextmanager
def process(args: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_replicas(stack: ExitStack, work: Path, speedup: float) -> list[int]:
    ports = [free_port() for _ in range(REPLICAS)]
    model = work / "model"
    model.mkdir(exist_ok=True)
    for i, port in enumerate(ports):
        stack.enter_context(
            process(
                [
                    sys.executable,
                    "-m",
                    "agent.runtimes.simulated_server",
                    "--model-path",
                    str(model),
                    "--served-model-name",
                    MODEL,
                    "--port",
                    str(port),
                    "--enable-metrics",
                    "--enable-cache-report",
                    "--gpu-model",
                    "NVIDIA H100 80GB HBM3",
                    "--speedup",
                    str(speedup),
                ],
                work / f"replica-{i}.log",
            )
        )
    for port in ports:
        wait_http(f"http://127.0.0.1:{port}/health")
    return ports


# -- the stand-in scheduler: GatewayService over real gRPC ----------------------------------------


def fleet_server(ports: list[int], appear: Any = None) -> Any:
    """A grpc.aio server in a thread streaming the replicas as one RoutableFleet; with
    ``appear`` (a threading.Event), an empty fleet until the event is set (a cold start)."""
    import threading

    import grpc
    from google.protobuf import duration_pb2

    from common.v1 import agent_pb2 as pb
    from common.v1 import agent_pb2_grpc as rpc

    class Service(rpc.GatewayServiceServicer):
        async def WatchFleet(self, request: Any, context: Any) -> Any:
            fleet = pb.RoutableFleet(report_interval=duration_pb2.Duration(seconds=1))
            for i, port in enumerate(ports):
                fleet.replicas.append(
                    pb.RoutableReplica(
                        replica_id=f"r{i}",
                        deployment="bench",
                        agent_id=f"node-{i}",
                        host="127.0.0.1",
                        port=port,
                        pool="reserved",
                        provider="onprem",
                        region="lab",
                        residency_group="lab",
                        state=pb.REPLICA_STATE_HEALTHY,
                        max_running_requests=256,
                    )
                )
            empty = pb.RoutableFleet(report_interval=duration_pb2.Duration(seconds=1))
            while True:
                yield fleet if appear is None or appear.is_set() else empty
                await asyncio.sleep(0.05 if appear is not None and not appear.is_set() else 1.0)

        async def ReportTraffic(self, request: Any, context: Any) -> Any:
            return pb.GatewayReportAck(report_interval=duration_pb2.Duration(seconds=1))

    port = free_port()
    ready = threading.Event()

    def serve() -> None:
        async def main() -> None:
            server = grpc.aio.server()
            rpc.add_GatewayServiceServicer_to_server(Service(), server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            ready.set()
            await server.wait_for_termination()

        asyncio.run(main())

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(10)
    return port


def gateway_files(
    work: Path, scheduler_port: int, affinity: bool, name: str = ""
) -> tuple[Path, int]:
    import yaml

    port = free_port()
    policy = {
        "deployments": {
            "bench": {
                "model": MODEL,
                "weights": "/models/bench",
                "runtime": "simulated",
                "sku": "H100-80GB",
                "gpus": 1,
                "pools": ["reserved"],
                "max_replicas": REPLICAS,
                "autoscaling": {"target": 4},
                "gateway": {"affinity": affinity, "queue_size": 4096, "warmup_s": 0},
            }
        }
    }
    name = name or ("affinity" if affinity else "plain")
    (work / f"policy-{name}.yaml").write_text(yaml.safe_dump(policy))
    (work / "gateway.token").write_text("bench-token\n")
    config = {
        "gateway_id": f"bench-{name}",
        "listen": f"127.0.0.1:{port}",
        "policy_file": str(work / f"policy-{name}.yaml"),
        "scheduler": {
            "address": f"127.0.0.1:{scheduler_port}",
            "token_file": str(work / "gateway.token"),
        },
    }
    path = work / f"gateway-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


# -- the load generator (its own process) ----------------------------------------------------------


async def drive_throughput(
    urls: list[str], concurrency: int, seconds: float, warmup_s: float
) -> dict[str, Any]:
    import aiohttp

    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4,
            "stream": True,
        }
    ).encode()
    ttfb: list[float] = []
    done = 0
    errors = 0
    start = time.monotonic()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(index: int) -> None:
            nonlocal done, errors
            n = index
            while time.monotonic() < stop_at:
                url = urls[n % len(urls)]
                n += 1
                began = time.monotonic()
                try:
                    async with session.post(
                        url, data=body, headers={"content-type": "application/json"}
                    ) as response:
                        first = True
                        async for _chunk in response.content.iter_any():
                            if first:
                                first_at = time.monotonic()
                                first = False
                        if response.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                if began >= measure_from and time.monotonic() <= stop_at:
                    ttfb.append(first_at - began)
                    done += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"ttfb_s": ttfb, "completed": done, "errors": errors, "seconds": seconds}


def conversations(count: int, turns: int, prompts: int, salt: str) -> list[list[str]]:
    """Each turn's prompt is the whole conversation so far: a shared system prompt (about
    1,500 tokens), then every earlier question and answer (about 500 tokens a turn). ``salt``
    starts every prompt, so no configuration finds another's prompts in the replicas' caches."""
    rng = random.Random(salt)
    systems = [f"{salt} " + " ".join(f"rule{p}-{w}" for w in range(600)) for p in range(prompts)]
    out = []
    for c in range(count):
        history = [systems[c % prompts]]
        convo = []
        for t in range(turns):
            history.append(f"user {c} turn {t}: " + " ".join(rng.choices(["a", "bb", "c"], k=60)))
            convo.append("\n".join(history))
            answer = " ".join(rng.choices(["yes", "no", "maybe", "indeed"], k=300))
            history.append(f"assistant {c} turn {t}: {answer}")
        out.append(convo)
    return out


async def drive_multiturn(
    urls: list[str], concurrency: int, count: int, turns: int, prompts: int, salt: str
) -> dict[str, Any]:
    import aiohttp

    work = conversations(count, turns, prompts, salt)
    queue: asyncio.Queue[tuple[int, list[str]]] = asyncio.Queue()
    for i, convo in enumerate(work):
        queue.put_nowait((i, convo))
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                index, convo = queue.get_nowait()
                for prompt in convo:
                    body = {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": 1,
                        "user": f"conversation-{index}",
                    }
                    began = time.monotonic()
                    url = urls[index % len(urls)]
                    async with session.post(url, json=body) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                            continue
                    latencies.append(time.monotonic() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"ttft_s": latencies, "errors": errors}


# -- measuring --------------------------------------------------------------------------------


def replica_counters(ports: list[int]) -> list[dict[str, float]]:
    import urllib.request

    rows = []
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            for key in ("num_requests_total", "prompt_tokens_total", "cached_tokens_total"):
                if line.startswith(f"sglang:{key}{{"):
                    values[key] = float(line.rsplit(" ", 1)[1])
        rows.append(values)
    return rows


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Sampler:
    """CPU seconds and peak RSS of one process, polled."""

    def __init__(self, pid: int | None) -> None:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        self.proc = psutil.Process(pid) if pid else None
        self.peak = 0
        self.cpu0 = self._cpu()

    def _cpu(self) -> float:
        if self.proc is None:
            return 0.0
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def poll(self) -> None:
        if self.proc is not None:
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def cpu(self) -> float:
        return self._cpu() - self.cpu0


def measure(name: str, pid: int | None, driver_args: list[str]) -> tuple[dict[str, Any], Sampler]:
    """Run the load generator in its own process while sampling the proxy ``pid``."""
    sampler = Sampler(pid)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Files, not pipes: the result is large, and a full pipe would stall the driver.
        proc = subprocess.Popen(
            [sys.executable, __file__, "--drive", *driver_args], stdout=out, stderr=err
        )
        while proc.poll() is None:
            sampler.poll()
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: driver failed: {err.read()[-2000:]}")
        result: dict[str, Any] = json.loads(out.read())
    return result, sampler


def start_router(
    stack: ExitStack, log: Path, ports: list[int]
) -> tuple[int, subprocess.Popen[bytes]]:
    """sglang-router with ``cache_aware`` over the replicas on ``ports`` (none: no worker)."""
    port = free_port()
    workers = ["--worker-urls", *(f"http://127.0.0.1:{p}" for p in ports)] if ports else []
    args = ["--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware", *workers]
    command = [sys.executable, "-m", "sglang_router.launch_router", *args]
    return port, stack.enter_context(process(command, log))


def cold_start(stack: ExitStack, work: Path, ports: list[int]) -> list[dict[str, Any]]:
    """Spillway's gateway with an empty fleet that gains the replicas 2 s later, against
    sglang-router started with no worker; 8 requests sent at once to each."""
    import threading
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    appear = threading.Event()
    config, port = gateway_files(work, fleet_server(ports, appear), True, name="cold")
    stack.enter_context(
        process(
            [sys.executable, "-m", "spillway", "gateway", "run", "--config", str(config)],
            work / "cold.log",
        )
    )
    wait_http(f"http://127.0.0.1:{port}/health")
    router_port, _ = start_router(stack, work / "router-empty.log", [])
    wait_http(f"http://127.0.0.1:{router_port}/health")
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ).encode()

    def call(url: str) -> tuple[int, float]:
        began = time.monotonic()
        request = urllib.request.Request(
            url, data=body, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                return response.status, time.monotonic() - began
        except urllib.error.HTTPError as exc:
            return exc.code, time.monotonic() - began

    rows = []
    for name, url in (
        ("spillway", f"http://127.0.0.1:{port}/v1/chat/completions"),
        ("sglang-router", f"http://127.0.0.1:{router_port}/v1/chat/completions"),
    ):
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call, url) for _ in range(8)]
            if name == "spillway":
                time.sleep(2.0)
                appear.set()
            outcomes = [f.result() for f in futures]
        codes = sorted({c for c, _ in outcomes})
        waits = [w for _, w in outcomes]
        rows.append(
            {
                "path": name,
                "answered": sum(1 for c, _ in outcomes if c == 200),
                "refused": sum(1 for c, _ in outcomes if c != 200),
                "statuses": ",".join(map(str, codes)),
                "wait_p50_s": statistics.median(waits),
                "wait_max_s": max(waits),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drive", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = parser.parse_args()
    if args.drive is not None:
        kind, *rest = args.drive
        if kind == "throughput":
            urls, c, secs, warm = rest[0].split(","), int(rest[1]), float(rest[2]), float(rest[3])
            result = asyncio.run(drive_throughput(urls, c, secs, warm))
        else:
            urls = rest[0].split(",")
            count, turns = int(rest[2]), int(rest[3])
            result = asyncio.run(drive_multiturn(urls, int(rest[1]), count, turns, 4, rest[4]))
        print(json.dumps(result))
        return 0
    return run_all(args.quick, args.out)


def run_all(quick: bool, out_path: Path) -> int:
    from rich.console import Console
    from rich.table import Table

    levels = [64, 256] if quick else [64, 256, 1024]
    seconds = 3.0 if quick else 6.0
    results: dict[str, Any] = {"machine": platform.platform(), "cpus": os.cpu_count()}
    console = Console()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        ports = start_replicas(stack, work, speedup=200.0)
        replica_urls = [f"http://127.0.0.1:{p}/v1/chat/completions" for p in ports]
        scheduler_port = fleet_server(ports)
        proxies: dict[str, tuple[str, int | None]] = {"direct": (",".join(replica_urls), None)}
        for affinity, label in ((True, "spillway"), (False, "spillway-no-affinity")):
            config, port = gateway_files(work, scheduler_port, affinity)
            proc = stack.enter_context(
                process(
                    [sys.executable, "-m", "spillway", "gateway", "run", "--config", str(config)],
                    work / f"{label}.log",
                )
            )
            wait_http(f"http://127.0.0.1:{port}/health")
            proxies[label] = (f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid)
        router_port, router = start_router(stack, work / "router.log", ports)
        wait_http(f"http://127.0.0.1:{router_port}/health")
        time.sleep(2.0)  # the router checks its workers' health before it routes
        proxies["sglang-router"] = (
            f"http://127.0.0.1:{router_port}/v1/chat/completions",
            router.pid,
        )
        time.sleep(1.5)  # the gateways have their fleet

        table = Table(title="Throughput and added time to first byte (streaming chat)")
        for col in (
            "streams",
            "path",
            "req/s",
            "TTFB p50 ms",
            "TTFB p99 ms",
            "added p50",
            "added p99",
            "CPU ms/req",
            "peak RSS MB",
            "errors",
        ):
            table.add_column(col, justify="right")
        results["throughput"] = []
        for c in levels:
            base: dict[str, float] = {}
            for name in ("direct", "spillway", "sglang-router"):
                url, pid = proxies[name]
                r, sampler = measure(name, pid, ["throughput", url, str(c), str(seconds), "1.0"])
                rps = r["completed"] / r["seconds"]
                p50, p99 = pct(r["ttfb_s"], 0.5) * 1e3, pct(r["ttfb_s"], 0.99) * 1e3
                if name == "direct":
                    base = {"p50": p50, "p99": p99}
                row = {
                    "streams": c,
                    "path": name,
                    "requests_per_s": rps,
                    "ttfb_p50_ms": p50,
                    "ttfb_p99_ms": p99,
                    "added_p50_ms": p50 - base["p50"],
                    "added_p99_ms": p99 - base["p99"],
                    "cpu_ms_per_request": sampler.cpu() * 1e3 / max(r["completed"], 1)
                    if pid
                    else None,
                    "peak_rss_mb": sampler.peak / 2**20 if pid else None,
                    "errors": r["errors"],
                }
                results["throughput"].append(row)
                table.add_row(
                    str(c),
                    name,
                    f"{rps:,.0f}",
                    f"{p50:.1f}",
                    f"{p99:.1f}",
                    "-" if name == "direct" else f"{row['added_p50_ms']:+.1f}",
                    "-" if name == "direct" else f"{row['added_p99_ms']:+.1f}",
                    "-"
                    if row["cpu_ms_per_request"] is None
                    else f"{row['cpu_ms_per_request']:.2f}",
                    "-" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.0f}",
                    str(r["errors"]),
                )
        console.print(table)

        table = Table(title="Multi-turn conversations sharing 4 system prompts (prefix cache)")
        for col in (
            "routing",
            "hit rate",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "busiest / mean",
            "errors",
        ):
            table.add_column(col, justify="right")
        results["affinity"] = []
        count, turns = (60, 4) if quick else (160, 5)
        for name in ("spillway", "spillway-no-affinity", "sglang-router"):
            url, pid = proxies[name]
            before = replica_counters(ports)
            r, _ = measure(name, pid, ["multiturn", url, "16", str(count), str(turns), name])
            after = replica_counters(ports)
            delta = [
                {k: a.get(k, 0.0) - b.get(k, 0.0) for k in a}
                for a, b in zip(after, before, strict=True)
            ]
            prompt = sum(d["prompt_tokens_total"] for d in delta)
            cached = sum(d["cached_tokens_total"] for d in delta)
            served = [d["num_requests_total"] for d in delta]
            busiest = max(served) / statistics.mean(served) if sum(served) else float("nan")
            row = {
                "routing": name,
                "hit_rate": cached / prompt if prompt else 0.0,
                "ttft_p50_ms": pct(r["ttft_s"], 0.5) * 1e3,
                "ttft_p99_ms": pct(r["ttft_s"], 0.99) * 1e3,
                "busiest_over_mean": busiest,
                "errors": r["errors"],
            }
            results["affinity"].append(row)
            table.add_row(
                name,
                f"{row['hit_rate']:.1%}",
                f"{row['ttft_p50_ms']:.1f}",
                f"{row['ttft_p99_ms']:.1f}",
                f"{busiest:.2f}",
                str(r["errors"]),
            )
        console.print(table)
        results["cold_start"] = cold_start(stack, work, ports)
        table = Table(title="Cold start: 8 requests while the deployment has no replica yet")
        for col in ("path", "answered", "refused", "statuses", "wait p50 s", "wait max s"):
            table.add_column(col, justify="right")
        for row in results["cold_start"]:
            table.add_row(
                row["path"],
                str(row["answered"]),
                str(row["refused"]),
                row["statuses"],
                f"{row['wait_p50_s']:.2f}",
                f"{row['wait_max_s']:.2f}",
            )
        console.print(table)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
