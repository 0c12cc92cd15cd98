"""The partial files of a download: which objects still need fetching, what an interrupted run
left that can be trusted, whether the destination has room for the rest, and the ``.part``
files themselves (opened, sized, reserved, and replaced when an object changes at the origin).

Saved ranges are trusted only when the progress entry's key (size, version, checksums, ETag and
Last-Modified) equals the one of the fresh listing and the part file has the object's size.
The free-space check counts what the part files already hold: those blocks are rewritten in
place, or given back when an untrusted part file is truncated.

This module touches the destination's file system only; it never fetches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.prefetch.errors import DiskFullError, PrefetchError
from agent.prefetch.model import FileResult, RemoteObject, safe_relpath
from agent.prefetch.state import (
    PARTIAL,
    PROGRESS,
    STATE_DIR,
    Interval,
    Manifest,
    covered,
    merge_progress,
    missing,
    parse_ranges,
    read_json,
)
from agent.prefetch.transport import disk_error
from agent.prefetch.verify import Digests

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_TMPFS_MAGIC = 0x01021994
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _fallocate() -> Any:
    """libc's ``fallocate`` with its argument types set, or None where there is none."""
    function: Any = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return function


def memory_backed(path: Path) -> bool:
    """True on tmpfs, where ``fallocate`` zeroes every page it reserves (about 0.25 CPU
    seconds per GiB on a small VM) only for the download to overwrite them."""
    statfs = getattr(_libc, "statfs", None)
    if statfs is None:
        return False
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word on Linux
    if statfs(os.fsencode(path), buf) != 0:
        return False
    f_type = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder)
    return f_type == _TMPFS_MAGIC


def preallocate(fd: int, size: int, what: str, reserve: bool) -> None:
    """Give the file its final size; with ``reserve``, also claim the blocks so that a full
    disk shows now, not half-way (where the file system cannot, the file stays sparse)."""
    if size == 0:
        return
    fallocate = _fallocate()
    if reserve and fallocate is not None:
        if fallocate(fd, 0, 0, size) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"{what}: no space left on the destination for {size} bytes ({os.strerror(err)})"
            )
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise disk_error(exc, what) from exc


def release(fd: int, size: int) -> None:
    """Give back the blocks of a part file that will never be read again, keeping its size
    (a reader that still maps it sees zeros, never a fault); best effort."""
    fallocate = _fallocate()
    if fd >= 0 and size > 0 and fallocate is not None:
        fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, size)


def held_bytes(path: Path, limit: int) -> int:
    """How many bytes of blocks ``path`` already occupies (0 when it is missing), at most
    ``limit``."""
    try:
        return min(limit, os.stat(path).st_blocks * 512)
    except OSError:
        return 0


@dataclass(frozen=True, eq=False)
class Version:
    """One version of an object being fetched: what every range of it asks for and where it
    writes. A range that finishes after its file moved on to a newer version counts for
    nothing (versions compare by identity)."""

    obj: RemoteObject
    fd: int
    headers: dict[str, str] = field(default_factory=dict)


class PartFile:
    """One object being fetched into its ``.part`` file, and what is known about its bytes."""

    def __init__(self, obj: RemoteObject, final: Path, part: Path, sha256: bool) -> None:
        self.final = final
        self.part = part
        self.sha256 = sha256
        self.fd = -1
        self.current = Version(obj, -1, obj.request_headers())
        self.intervals: list[Interval] = []
        self.gaps: deque[Interval] = deque()
        self.digests = Digests(obj.checksums, sha256)
        self.verify_attempts = 0
        self.fetched = 0
        self.resumed = 0
        self.restarts = 0
        self.refreshing = False
        self.result: FileResult | None = None

    @property
    def obj(self) -> RemoteObject:
        return self.current.obj

    def forget(self) -> tuple[int, int]:
        """Drop all that is known of the current version's bytes; returns (bytes that were
        still waiting for a connection, resumed bytes dropped). The version is replaced by a
        copy of itself, so that ranges of it still in flight no longer count."""
        waiting = sum(b - a for a, b in self.gaps)
        self.gaps.clear()
        ver = self.current
        self.current = Version(ver.obj, ver.fd, ver.headers)
        self.intervals = []
        self.digests = Digests({}, False)
        resumed, self.resumed = self.resumed, 0
        return waiting, resumed

    def start_over(self, obj: RemoteObject, fd: int) -> None:
        """Fetch ``obj`` from its first byte into ``fd`` (after ``forget``)."""
        self.fd = fd
        self.current = Version(obj, fd, obj.request_headers())
        self.digests = Digests(obj.checksums, self.sha256)
        self.gaps = deque([(0, obj.size)] if obj.size else [])

    @property
    def what(self) -> str:
        return self.current.obj.path


@dataclass
class Plan:
    skipped: list[FileResult]
    files: list[PartFile]
    resumed_bytes: int
    needed_bytes: int  # what the destination must still find room for
    reserve: bool = True  # whether part files claim their blocks up front (not on tmpfs)


def prepare(
    objects: list[RemoteObject], dest: Path, hint: Any, sha256: bool
) -> tuple[Manifest, Plan]:
    """Read what earlier runs left in ``dest`` (the manifest, the progress sidecar and a
    heartbeat ``hint``), plan the files still to fetch, check that they fit, and open their
    part files. Raises ``DiskFullError`` when they do not fit."""
    state_dir = dest / STATE_DIR
    (state_dir / PARTIAL).mkdir(parents=True, exist_ok=True)
    manifest = Manifest(dest)
    saved = merge_progress(parse_ranges(read_json(state_dir / PROGRESS)), parse_ranges(hint))
    planned = plan(objects, dest, saved, manifest, sha256)
    free = shutil.disk_usage(state_dir).free
    if planned.needed_bytes > free:
        raise DiskFullError(
            f"{dest}: {planned.needed_bytes} more bytes needed for the files still to fetch "
            f"but only {free} bytes free"
        )
    # On tmpfs the free-space check above stands in for reserving: reserving would zero
    # every page first, which costs more CPU than receiving the bytes into them.
    planned.reserve = not memory_backed(state_dir)
    try:
        for f in planned.files:
            open_part(f, planned.reserve)
    except BaseException:
        for f in planned.files:
            if f.fd >= 0:
                os.close(f.fd)
        raise
    return manifest, planned


def plan(
    objects: list[RemoteObject],
    dest: Path,
    saved: dict[str, tuple[str, list[Interval]]],
    manifest: Manifest,
    sha256: bool,
) -> Plan:
    """Sort ``objects`` into files already in place and files to fetch (with the saved ranges
    that can be trusted)."""
    result = Plan([], [], 0, 0)
    seen: set[str] = set()
    for obj in objects:
        path = safe_relpath(obj.path)
        if path in seen:
            raise PrefetchError(f"two objects map to the same file {path!r}")
        seen.add(path)
        done = manifest.is_complete(dest, path, obj.identity(), obj.size)
        if done is not None:
            result.skipped.append(done)
            continue
        part = dest / STATE_DIR / PARTIAL / (path + ".part")
        f = PartFile(obj, dest / path, part, sha256)
        prior = saved.get(path)
        if prior is not None and prior[0] == obj.resume_key() and _size(part) == obj.size:
            f.intervals = [(a, min(b, obj.size)) for a, b in prior[1] if a < obj.size]
            f.resumed = covered(f.intervals)
            result.resumed_bytes += f.resumed
        result.needed_bytes += obj.size - held_bytes(part, obj.size)
        result.files.append(f)
    return result


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def open_part(f: PartFile, reserve: bool) -> None:
    """Open ``f``'s part file: kept as it is when it has trusted ranges, else emptied and
    sized anew; ``f.gaps`` become what is missing."""
    f.part.parent.mkdir(parents=True, exist_ok=True)
    fresh = not f.intervals
    try:
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0)
        f.fd = os.open(f.part, flags, 0o644)
    except OSError as exc:
        raise disk_error(exc, f.what) from exc
    f.current = Version(f.obj, f.fd, f.obj.request_headers())
    if fresh:
        preallocate(f.fd, f.obj.size, f.what, reserve)
    f.gaps = deque(missing(f.obj.size, f.intervals))


def reopen_part(f: PartFile, obj: RemoteObject, reserve: bool) -> int:
    """A new, empty part file for ``obj`` (a newer version of ``f``'s object) at ``f.part``;
    returns its descriptor. ``f.fd`` stays open on the old file, whose blocks are given back,
    so that ranges of the old version still in flight finish there, harmlessly."""
    try:
        f.part.unlink(missing_ok=True)
        fd = os.open(f.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise disk_error(exc, f.what) from exc
    release(f.fd, f.obj.size)
    try:
        preallocate(fd, obj.size, obj.path, reserve)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dirs(directories: set[Path]) -> None:
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
