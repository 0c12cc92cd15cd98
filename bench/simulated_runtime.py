"""Benchmark: the simulated runtime driven by a production trace at rising load.

Replays the Azure LLM conversation trace (TIMESTAMP, ContextTokens, GeneratedTokens; read from
``../shared/data/traces`` at run time, never copied) at several request rates: the trace's own
inter-arrival pattern, compressed or stretched to each rate, and its own prompt and output
lengths. Two drivers:

- ``model``: the continuous-batching model itself in virtual time (exact, fast), for the whole
  latency curve of a GPU profile;
- ``http``: the real simulated server process over HTTP with streaming ``/generate`` calls, to
  show that what a client sees matches the model (TTFT measured at the first streamed chunk).

Prints a table per driver and writes JSON under ``bench/results/`` (not committed), including
the model driver's saturation point: the highest offered rate that is still served (request
throughput at least 95% of offered, and p90 TTFT no worse than max(2 s, 5x the p90 at the
lowest rate), at that rate and every lower one). Throughput counts completions between the
first and the last one: the offered rate while the server keeps up, its capacity once a backlog
forms. The http driver's levels are too short for a verdict; they are compared with the model
on the same requests instead.
This file is a benchmark, not a test: it asserts nothing.

    .venv/bin/python bench/simulated_runtime.py                      # both drivers
    .venv/bin/python bench/simulated_runtime.py --driver model --gpu "NVIDIA A100-SXM4-40GB"
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.runtimes.simulated_model import BatchingModel, profile_for_gpu  # noqa: E402

DEFAULT_TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"


@dataclass(frozen=True)
class TraceRequest:
    offset_s: float  # since the first request, at the trace's own pace
    prompt_tokens: int
    output_tokens: int


@dataclass
class Level:
    offered_rps: float
    requests: int
    completed: int
    achieved_rps: float
    output_tokens_per_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    sustained: bool = False


def read_trace(path: Path, limit: int) -> tuple[list[TraceRequest], float]:
    """The first ``limit`` requests and their native rate (requests/s) in the trace."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"{path}: no requests")
    stamps = [dt.datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
    first = stamps[0]
    requests = [
        TraceRequest(
            (stamp - first).total_seconds(), int(r["ContextTokens"]), int(r["GeneratedTokens"])
        )
        for stamp, r in zip(stamps[:limit], rows[:limit], strict=True)
    ]
    native = (len(requests) - 1) / max(1e-9, requests[-1].offset_s)
    return requests, native


def schedule(trace: list[TraceRequest], rate: float) -> list[float]:
    """Arrival times of ``trace`` at ``rate`` requests/s on average, keeping its burstiness."""
    first = trace[0].offset_s
    span = trace[-1].offset_s - first
    if len(trace) < 2 or span <= 0:
        return [i / rate for i in range(len(trace))]
    scale = (len(trace) - 1) / span / rate
    return [(r.offset_s - first) * scale for r in trace]


def for_level(trace: list[TraceRequest], rate: float, seconds: float) -> list[TraceRequest]:
    """The first requests of the trace, as many as ``seconds`` at ``rate`` needs (20 or more)."""
    return trace[: max(20, round(rate * seconds))]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarise(
    rate: float,
    arrivals: list[float],
    ttfts: list[float],
    e2es: list[float],
    finishes: list[tuple[float, int]],
) -> Level:
    """Throughput is measured between the first and the last completion: at the offered rate
    while the server keeps up, at its capacity once a backlog forms."""
    times = sorted(at for at, _ in finishes)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    tokens = sum(n for _, n in finishes) - (min(finishes)[1] if finishes else 0)
    return Level(
        offered_rps=rate,
        requests=len(arrivals),
        completed=len(finishes),
        achieved_rps=(len(times) - 1) / span if span > 0 else 0.0,
        output_tokens_per_s=tokens / span if span > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p90_s=percentile(ttfts, 90),
        ttft_p99_s=percentile(ttfts, 99),
        e2e_p50_s=percentile(e2es, 50),
        e2e_p99_s=percentile(e2es, 99),
    )


def run_model(trace: list[TraceRequest], rate: float, gpu: str) -> Level:
    """Replay in virtual time; requests still unfinished 120 s after the last arrival are left
    out of the latency figures (they only happen far past saturation)."""
    profile = profile_for_gpu(gpu)
    model = BatchingModel(profile)
    arrivals = schedule(trace, rate)
    ttfts: list[float] = []
    e2es: list[float] = []
    finishes: list[tuple[float, int]] = []
    window_end = arrivals[-1] + 120.0
    for i, (request, at) in enumerate(zip(trace, arrivals, strict=True)):
        for update in model.advance(at):
            if update.finished and update.at <= window_end:
                assert update.first_token_at is not None
                ttfts.append(update.first_token_at - update.arrived_at)
                e2es.append(update.at - update.arrived_at)
                finishes.append((update.at, update.generated))
        model.submit(str(i), request.prompt_tokens, request.output_tokens, at)
    for update in model.advance(window_end):
        if update.finished:
            assert update.first_token_at is not None
            ttfts.append(update.first_token_at - update.arrived_at)
            e2es.append(update.at - update.arrived_at)
            finishes.append((update.at, update.generated))
    return summarise(rate, arrivals, ttfts, e2es, finishes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def run_http(trace: list[TraceRequest], rate: float, url: str, seconds: float) -> Level:
    import httpx

    trace = for_level(trace, rate, seconds)
    arrivals = schedule(trace, rate)
    ttfts: list[float] = []
    e2es: list[float] = []
    finishes: list[tuple[float, int]] = []
    start = time.monotonic()

    async def one(request: TraceRequest, at: float, http: httpx.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        sent = time.monotonic()
        body = {
            "text": "x" * (4 * request.prompt_tokens),  # the server counts ~4 chars a token
            "sampling_params": {"max_new_tokens": request.output_tokens},
            "stream": True,
        }
        first: float | None = None
        generated = 0
        async with http.stream("POST", "/generate", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first is None:
                    first = time.monotonic()
                generated = json.loads(line[6:])["meta_info"]["completion_tokens"]
        if first is not None and generated == request.output_tokens:
            ttfts.append(first - sent)
            e2es.append(time.monotonic() - sent)
            finishes.append((time.monotonic() - start, generated))

    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(one(r, a, http) for r, a in zip(trace, arrivals, strict=True)))
    return summarise(rate, arrivals, ttfts, e2es, finishes)


def mark_saturation(levels: list[Level]) -> float | None:
    """Mark each level sustained or not; return the highest rate below the first that is not."""
    if not levels:
        return None
    limit = max(2.0, 5 * levels[0].ttft_p90_s)
    for level in levels:
        level.sustained = (
            level.achieved_rps >= 0.95 * level.offered_rps and level.ttft_p90_s <= limit
        )
    best = None
    for level in levels:
        if not level.sustained:
            break
        best = level.offered_rps
    return best


def table(title: str, levels: list[Level], verdict: bool = True) -> str:
    head = (
        f"{'offered r/s':>11} {'done r/s':>9} {'out tok/s':>10} {'TTFT p50':>9} {'p90':>8} "
        f"{'p99':>8} {'e2e p50':>8} {'p99':>8}  {'sustained' if verdict else ''}"
    )
    lines = [title, head, "-" * len(head)]
    for lv in levels:
        lines.append(
            f"{lv.offered_rps:>11.2f} {lv.achieved_rps:>9.2f} {lv.output_tokens_per_s:>10.0f} "
            f"{lv.ttft_p50_s:>8.3f}s {lv.ttft_p90_s:>7.3f}s {lv.ttft_p99_s:>7.3f}s "
            f"{lv.e2e_p50_s:>7.2f}s {lv.e2e_p99_s:>7.2f}s  "
            + (("yes" if lv.sustained else "NO") if verdict else "")
        )
    return "\n".join(lines)


def http_levels(
    trace: list[TraceRequest], rates: list[float], gpu: str, seconds: float
) -> list[Level]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as model_dir:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.runtimes.simulated_server",
                "--model-path",
                model_dir,
                "--port",
                str(port),
                "--gpu-model",
                gpu,
                "--warmup-s",
                "0",
                "--enable-metrics",
                # The driver's prompts repeat one character: without this every one would hit
                # the prefix cache, which the model driver does not have.
                "--disable-radix-cache",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            return asyncio.run(_levels_over_http(trace, rates, url, seconds))
        finally:
            server.terminate()
            server.wait(60)


async def _levels_over_http(
    trace: list[TraceRequest], rates: list[float], url: str, seconds: float
) -> list[Level]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=2) as http:
        for _ in range(300):
            try:
                if (await http.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    levels = []
    for rate in rates:
        levels.append(await run_http(trace, rate, url, seconds))
        print(f"  http {rate:g} r/s done", file=sys.stderr)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--driver", choices=["model", "http", "both"], default="both")
    parser.add_argument("--gpu", default="NVIDIA H100 80GB HBM3", help="model driver's GPU")
    parser.add_argument(
        "--rates", default="2,4,6,8,10,12,14,16,20,24", help="model driver, requests/s"
    )
    parser.add_argument("--requests", type=int, default=4000, help="model driver: trace rows")
    parser.add_argument("--http-gpu", default="NVIDIA L40S", help="http driver's GPU")
    parser.add_argument("--http-rates", default="0.5,1,2,3,4", help="http driver, requests/s")
    parser.add_argument("--http-seconds", type=float, default=20.0, help="per http level")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    trace, native = read_trace(args.trace, args.requests)
    report: dict[str, Any] = {
        "benchmark": "simulated_runtime",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "trace": {"file": args.trace.name, "native_rps": native, "rows_used": len(trace)},
        "saturation_rule": "achieved >= 95% of offered and TTFT p90 <= max(2s, 5x lowest-rate p90)",
    }
    if args.driver in ("model", "both"):
        rates = [float(r) for r in args.rates.split(",")]
        levels = [run_model(trace, rate, args.gpu) for rate in rates]
        saturation = mark_saturation(levels)
        profile = profile_for_gpu(args.gpu)
        print(table(f"model driver, {profile.name} profile, {len(trace)} trace requests", levels))
        print(f"saturation: {saturation} requests/s\n")
        report["model"] = {
            "profile": asdict(profile),
            "levels": [asdict(lv) for lv in levels],
            "saturation_rps": saturation,
        }
    if args.driver in ("http", "both"):
        rates = [float(r) for r in args.http_rates.split(",")]
        # Levels this short cannot show a backlog building up, so they get no verdict: they
        # check that a client of the real server sees what the model predicts.
        levels = http_levels(trace, rates, args.http_gpu, args.http_seconds)
        profile = profile_for_gpu(args.http_gpu)
        title = f"http driver, {profile.name} profile, {args.http_seconds:g}s of trace per level"
        print(table(title, levels, verdict=False))
        model_levels = [
            run_model(for_level(trace, r, args.http_seconds), r, args.http_gpu) for r in rates
        ]
        print(table("the same requests in the model (virtual time)", model_levels, verdict=False))
        gaps = {
            "ttft_p50_s": max(
                abs(h.ttft_p50_s - m.ttft_p50_s) for h, m in zip(levels, model_levels, strict=True)
            ),
            "ttft_p99_s": max(
                abs(h.ttft_p99_s - m.ttft_p99_s) for h, m in zip(levels, model_levels, strict=True)
            ),
            "e2e_p50_s": max(
                abs(h.e2e_p50_s - m.e2e_p50_s) for h, m in zip(levels, model_levels, strict=True)
            ),
        }
        print(
            "http vs model, largest gap: "
            + ", ".join(f"{name} {gap * 1000:.0f} ms" for name, gap in gaps.items())
            + "\n"
        )
        report["http"] = {
            "profile": asdict(profile),
            "seconds_of_trace_per_level": args.http_seconds,
            "levels": [asdict(lv) for lv in levels],
            "model_levels": [asdict(lv) for lv in model_levels],
            "largest_gap_vs_model": gaps,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"simulated_runtime-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
