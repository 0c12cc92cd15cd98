"""``spillway prefetch SRC DEST``: the engine behind a progress bar (or ``--json``), with exit
codes a script can act on: 0 done, 1 transfer failed, 2 bad input (a file where DEST must be a
directory too), 3 not found, 4 access denied, 5 verification failed, 6 disk full, 7 the object
changed at the origin during the download and kept changing. Every failure is one line on
stderr (and, with ``--json``, one JSON object on stdout), never a traceback.

DEST is read as ``cp`` reads it: for a SRC that names one object, an existing directory or a
DEST ending in ``/`` receives the file, any other DEST is the file itself; for a prefix or a
file list DEST is a directory. ``spillway/cli.py`` declares the arguments (DEST as a ``str``,
so that a trailing ``/`` survives) and calls ``run``.

Only presentation and error mapping live here; the download itself is ``agent.prefetch``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from typing import Any

from agent.prefetch import (
    AuthError,
    DiskFullError,
    InvalidInputError,
    NotFoundError,
    OriginChangedError,
    PrefetchError,
    PrefetchResult,
    Progress,
    SourceOptions,
    Tuning,
    VerificationError,
    prefetch,
)
from agent.prefetch.transport import disk_error

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND = 3
EXIT_AUTH = 4
EXIT_VERIFICATION = 5
EXIT_DISK_FULL = 6
EXIT_ORIGIN_CHANGED = 7

_EXIT_CODES: list[tuple[type[PrefetchError], int, str]] = [
    (InvalidInputError, EXIT_BAD_INPUT, "bad_input"),
    (NotFoundError, EXIT_NOT_FOUND, "not_found"),
    (AuthError, EXIT_AUTH, "auth"),
    (VerificationError, EXIT_VERIFICATION, "verification_failed"),
    (DiskFullError, EXIT_DISK_FULL, "disk_full"),
    (OriginChangedError, EXIT_ORIGIN_CHANGED, "origin_changed"),
]

_SIZE = re.compile(r"(\d+)\s*([kmg]?)i?b?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``16M``, ``512k``, ``1G`` or a byte count (binary multiples)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size like 16M, 512K or 1048576")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(match.group(1)) * unit


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(int(seconds), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
        if minutes >= 60
        else f"{minutes}:{secs:02d}"
    )


def _result_json(result: PrefetchResult) -> dict[str, Any]:
    data = asdict(result)
    data["mb_per_s"] = round(result.mb_per_s, 1)
    data["seconds"] = round(result.seconds, 3)
    return data


def run(args: argparse.Namespace) -> int:
    files = list(args.file)
    try:
        if args.files_from is not None:
            files += args.files_from.read_text().splitlines()
    except OSError as exc:
        print(f"spillway: error: --files-from {args.files_from}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        range_size = parse_size(args.range_size) if args.range_size else None
    except ValueError as exc:
        print(f"spillway: error: --range-size: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = SourceOptions(files=files, endpoint_url=args.endpoint_url)
    tuning = Tuning(
        connections=args.connections,
        max_connections=args.max_connections,
        range_size=range_size,
        retries=args.retries,
        fsync=not args.no_fsync,
        sha256=not getattr(args, "skip_sha256", False),
    )
    # A str keeps a trailing '/' (a Path would drop it), which says DEST is a directory.
    dest: str = args.dest if isinstance(args.dest, str) else str(args.dest)
    try:
        try:
            if args.json or not sys.stderr.isatty():
                result = prefetch(args.source, dest, options, tuning, copy=True)
            else:
                result = _with_progress_bar(args.source, dest, options, tuning)
        except OSError as exc:  # the engine maps its own; this is the last line of defence
            raise disk_error(exc, dest) from exc
    except PrefetchError as exc:
        code, kind = EXIT_FAILED, "failed"
        for cls, value, name in _EXIT_CODES:
            if isinstance(exc, cls):
                code, kind = value, name
        if args.json:
            print(json.dumps({"error": kind, "message": str(exc), "exit_code": code}))
        print(f"spillway: {kind.replace('_', ' ')}: {exc}", file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(_result_json(result), indent=2))
    else:
        print(
            f"{len(result.files)} files, {_fmt_bytes(result.total_bytes)} in {dest} "
            f"({_fmt_bytes(result.fetched_bytes)} fetched, {_fmt_bytes(result.resumed_bytes)} "
            f"resumed) in {result.seconds:.1f}s, {result.mb_per_s:.0f} MB/s",
            file=sys.stderr,
        )
    return EXIT_OK


def _with_progress_bar(
    source: str, dest: str, options: SourceOptions, tuning: Tuning
) -> PrefetchResult:
    from rich.progress import BarColumn, TextColumn
    from rich.progress import Progress as Bar

    bar = Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[bytes]}"),
        TextColumn("{task.fields[speed]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TextColumn("{task.fields[files]}"),
        transient=False,
    )
    task = bar.add_task("prefetch", total=None, bytes="", speed="", eta="-:--", files="")

    def show(p: Progress) -> None:
        remaining = p.total_bytes - p.done_bytes
        eta = remaining / p.bytes_per_s if p.bytes_per_s > 0 else None
        bar.update(
            task,
            total=max(1, p.total_bytes),
            completed=p.done_bytes,
            bytes=f"{_fmt_bytes(p.done_bytes)}/{_fmt_bytes(p.total_bytes)}",
            speed=f"{p.bytes_per_s / 1e6:7.1f} MB/s",
            eta=_fmt_eta(eta if remaining > 0 else 0),
            files=f"{p.files_done}/{p.files_total} files · {p.connections} conns",
        )

    with bar:
        return prefetch(source, dest, options, tuning, on_progress=show, copy=True)
