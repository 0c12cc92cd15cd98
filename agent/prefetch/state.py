"""What survives a killed download: the progress sidecar (completed byte ranges per file) and
the manifest of finished files, both JSON under ``DEST/.spillway/``.

Ranges are half-open ``[start, end)`` pairs, merged, so the sidecar and the activity's heartbeat
details stay small however many ranges a file had. This module does file I/O on the sidecar and
manifest only; it never touches the network or the data files.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.prefetch.model import FileResult

STATE_DIR = ".spillway"
PROGRESS = "progress.json"
MANIFEST = "manifest.json"
PARTIAL = "partial"

Interval = tuple[int, int]


def add_interval(intervals: list[Interval], start: int, end: int) -> list[Interval]:
    """``intervals`` with ``[start, end)`` added, sorted and merged."""
    if end <= start:
        return intervals
    merged: list[Interval] = []
    placed = False
    for a, b in intervals:
        if b < start:
            merged.append((a, b))
        elif end < a:
            if not placed:
                merged.append((start, end))
                placed = True
            merged.append((a, b))
        else:
            start, end = min(a, start), max(b, end)
    if not placed:
        merged.append((start, end))
    merged.sort()
    return merged


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """The bytes both merged lists cover."""
    result: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            result.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return result


def merge_progress(
    sidecar: dict[str, tuple[str, list[Interval]]], hint: dict[str, tuple[str, list[Interval]]]
) -> dict[str, tuple[str, list[Interval]]]:
    """Combine the sidecar with progress handed in from elsewhere (a heartbeat).

    Where both describe a file with the same identity only the bytes both claim are trusted:
    the sidecar belongs to the partial file beside it, the hint may be older than that file.
    """
    merged = dict(sidecar)
    for path, (identity, ranges) in hint.items():
        mine = merged.get(path)
        if mine is None or mine[0] != identity:
            merged[path] = (identity, ranges)
        else:
            merged[path] = (identity, intersect(mine[1], ranges))
    return merged


def covered(intervals: list[Interval]) -> int:
    return sum(b - a for a, b in intervals)


def missing(size: int, intervals: list[Interval]) -> list[Interval]:
    """The gaps of ``[0, size)`` not covered by ``intervals``."""
    gaps: list[Interval] = []
    pos = 0
    for a, b in intervals:
        if a > pos:
            gaps.append((pos, min(a, size)))
        pos = max(pos, b)
    if pos < size:
        gaps.append((pos, size))
    return [(a, b) for a, b in gaps if b > a]


def prefix_end(intervals: list[Interval]) -> int:
    """How many bytes from offset 0 are complete without a hole."""
    if intervals and intervals[0][0] == 0:
        return intervals[0][1]
    return 0


def parse_ranges(raw: Any) -> dict[str, tuple[str, list[Interval]]]:
    """Validate progress details (from the sidecar or a heartbeat): path -> (identity, ranges).

    Anything malformed is dropped rather than trusted: the cost is a re-download.
    """
    result: dict[str, tuple[str, list[Interval]]] = {}
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict):
        return result
    for path, entry in files.items():
        if not isinstance(path, str) or not isinstance(entry, dict):
            continue
        identity = entry.get("identity")
        ranges = entry.get("ranges")
        if not isinstance(identity, str) or not isinstance(ranges, list):
            continue
        intervals: list[Interval] = []
        ok = True
        for pair in ranges:
            if (
                isinstance(pair, list | tuple)
                and len(pair) == 2
                and all(isinstance(v, int) and v >= 0 for v in pair)
                and pair[0] < pair[1]
            ):
                intervals = add_interval(intervals, pair[0], pair[1])
            else:
                ok = False
        if ok:
            result[path] = (identity, intervals)
    return result


def ranges_json(files: dict[str, tuple[str, list[Interval]]]) -> dict[str, Any]:
    return {
        "version": 1,
        "files": {
            path: {"identity": identity, "ranges": [list(pair) for pair in intervals]}
            for path, (identity, intervals) in files.items()
        },
    }


def write_json_atomic(path: Path, data: Any, fsync: bool) -> None:
    """Replace ``path`` with ``data`` as JSON, or leave it as it was.

    The bytes go to ``path.tmp`` first, which is fsynced (with ``fsync``) and renamed over
    ``path``. On any failure, a full disk above all, the temporary file is removed and the
    error raised: ``path`` keeps its previous content and no empty ``.tmp`` is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    raw = memoryview(json.dumps(data, separators=(",", ":")).encode())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while raw:
                raw = raw[os.write(fd, raw) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Manifest:
    """``DEST/.spillway/manifest.json``: every finished file with its size, sha256 and identity."""

    def __init__(self, dest: Path) -> None:
        self.path = dest / STATE_DIR / MANIFEST
        raw = read_json(self.path)
        entries = raw.get("files") if isinstance(raw, dict) else None
        self.entries: dict[str, dict[str, Any]] = entries if isinstance(entries, dict) else {}

    def is_complete(self, dest: Path, path: str, identity: str, size: int) -> FileResult | None:
        """The recorded result if ``path`` is already in place with this identity and size."""
        entry = self.entries.get(path)
        if not isinstance(entry, dict) or entry.get("identity") != identity:
            return None
        try:
            if (dest / path).stat().st_size != size:
                return None
        except OSError:
            return None
        return FileResult(
            path=path,
            size=size,
            sha256=str(entry.get("sha256", "")),
            verified_with=list(entry.get("verified_with", [])),
            fetched_bytes=0,
            skipped=True,
        )

    def record(self, result: FileResult, identity: str, source: str) -> None:
        entry = asdict(result)
        entry.pop("fetched_bytes")
        entry.pop("skipped")
        entry["identity"] = identity
        entry["source"] = source
        self.entries[result.path] = entry

    def save(self, fsync: bool) -> None:
        write_json_atomic(self.path, {"version": 1, "files": self.entries}, fsync)
