"""The parallel byte-range download engine.

Given resolved objects and a destination directory, it keeps many ranges in flight across and
within files (small files whole, large ones cut into ranges sized from the measured
per-connection rate), writes each range at its offset into a preallocated ``.part`` file
(sized but not reserved on tmpfs, where reserving means zero-filling),
retries each range with backoff, hashes each file as its prefix completes, verifies it, and only
then fsyncs and renames it into place. Completed ranges are saved in a sidecar (and handed to an
``on_state`` callback, which the Temporal activity turns into heartbeats) so a killed process or
a retried activity resumes instead of starting over.

The engine must not know about any particular store: sources give it URLs and headers. It never
holds a file in memory: one buffer (or pipe) per connection plus one mapped window per hasher.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import logging
import mmap
import os
import random
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.prefetch.errors import (
    DiskFullError,
    PrefetchError,
    TransferError,
    VerificationError,
)
from agent.prefetch.model import (
    FileResult,
    MiB,
    PrefetchResult,
    RemoteObject,
    Tuning,
    safe_relpath,
)
from agent.prefetch.state import (
    PARTIAL,
    PROGRESS,
    STATE_DIR,
    Interval,
    Manifest,
    add_interval,
    covered,
    merge_progress,
    missing,
    parse_ranges,
    prefix_end,
    ranges_json,
    read_json,
    write_json_atomic,
)
from agent.prefetch.transport import Connections, RetryableError, disk_error, fetch_range
from agent.prefetch.verify import Digests, check_safetensors

log = logging.getLogger("agent.prefetch")

# Automatic connection count: start here and add CONNECTION_STEP while the aggregate rate
# keeps rising by GAIN; stop after two windows without such a gain.
INITIAL_CONNECTIONS = 24
CONNECTION_STEP = 12
GAIN = 1.05
# Ranges shrink to TAIL_RANGE only at the end, so the last connections finish together;
# otherwise a range is never below MIN_RANGE, which keeps a 30 ms first-byte delay under ~5%
# of a range even on a 50 MB/s-capped connection.
TAIL_RANGE = 4 * MiB
MIN_RANGE = 16 * MiB
INITIAL_RANGE = 16 * MiB
MAX_RANGE = 64 * MiB
RANGE_SECONDS = 1.0
HASH_CHUNK = 32 * MiB
HASHERS = 2
# Files downloaded at once (see _cut); one per hasher.
FILES_IN_FLIGHT = HASHERS
WINDOW_S = 0.5


@dataclass
class Progress:
    """A snapshot for progress displays."""

    total_bytes: int
    done_bytes: int
    fetched_bytes: int
    files_total: int
    files_done: int
    bytes_per_s: float
    connections: int
    elapsed_s: float


class _File:
    def __init__(self, obj: RemoteObject, final: Path, part: Path, sha256: bool) -> None:
        self.obj = obj
        self.final = final
        self.part = part
        self.fd = -1
        self.intervals: list[Interval] = []
        self.gaps: deque[Interval] = deque()
        self.digests = Digests(obj.checksums, sha256)
        self.verify_attempts = 0
        self.fetched = 0
        self.result: FileResult | None = None

    @property
    def what(self) -> str:
        return self.obj.path


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


_TMPFS_MAGIC = 0x01021994


def _memory_backed(path: Path) -> bool:
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


def _preallocate(fd: int, size: int, what: str, reserve: bool) -> None:
    """Give the file its final size; with ``reserve``, also claim the blocks so that a full
    disk shows now, not half-way (where the file system cannot, the file stays sparse)."""
    if size == 0:
        return
    fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
    if reserve and fallocate is not None:
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
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


class Engine:
    """One download of a list of objects into ``dest``. Use once: ``run()`` then discard."""

    def __init__(
        self,
        objects: list[RemoteObject],
        dest: Path,
        tuning: Tuning | None = None,
        resume: Any = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_state: Callable[[dict[str, Any]], None] | None = None,
        source: str = "",
    ) -> None:
        self.dest = dest
        self.tuning = tuning or Tuning()
        self.source = source
        self.on_progress = on_progress
        self.on_state = on_state
        self._resume_hint = resume
        self._objects = objects
        self._files: list[_File] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._failure: PrefetchError | None = None
        self._target = self.tuning.connections or INITIAL_CONNECTIONS
        self._range = self.tuning.range_size or INITIAL_RANGE
        self._undispatched = 0
        self._worker_bytes: list[int] = []
        self._workers: list[threading.Thread] = []
        self._finished = 0
        self._hash_next = 0
        self._turn = 0
        self._first_open = 0
        self._conns = Connections(self.tuning.timeout_s)
        self.resumed_bytes = 0

    # ----------------------------------------------------------------------------- set-up

    def _prepare(self) -> list[FileResult]:
        state_dir = self.dest / STATE_DIR
        (state_dir / PARTIAL).mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.dest)
        saved = merge_progress(
            parse_ranges(read_json(state_dir / PROGRESS)), parse_ranges(self._resume_hint)
        )
        skipped: list[FileResult] = []
        needed = 0
        seen: set[str] = set()
        for obj in self._objects:
            path = safe_relpath(obj.path)
            if path in seen:
                raise PrefetchError(f"two objects map to the same file {path!r}")
            seen.add(path)
            done = self.manifest.is_complete(self.dest, path, obj.identity(), obj.size)
            if done is not None:
                skipped.append(done)
                continue
            part = state_dir / PARTIAL / (path + ".part")
            f = _File(obj, self.dest / path, part, self.tuning.sha256)
            prior = saved.get(path)
            reuse = (
                prior is not None
                and prior[0] == obj.identity()
                and f.part.exists()
                and f.part.stat().st_size == obj.size
            )
            if reuse and prior is not None:
                f.intervals = [(a, min(b, obj.size)) for a, b in prior[1] if a < obj.size]
                self.resumed_bytes += covered(f.intervals)
            needed += obj.size - (covered(f.intervals) if reuse else 0)
            self._files.append(f)
        free = shutil.disk_usage(state_dir).free
        if needed > free:
            raise DiskFullError(
                f"{self.dest}: {needed} bytes still to fetch but only {free} bytes free"
            )
        # On tmpfs the free-space check above stands in for reserving: reserving would zero
        # every page first, which costs more CPU than receiving the bytes into them.
        reserve = not _memory_backed(state_dir)
        for f in self._files:
            f.part.parent.mkdir(parents=True, exist_ok=True)
            fresh = not f.intervals
            try:
                flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0)
                f.fd = os.open(f.part, flags, 0o644)
            except OSError as exc:
                raise disk_error(exc, f.what) from exc
            if fresh:
                _preallocate(f.fd, f.obj.size, f.what, reserve)
            f.gaps = deque(missing(f.obj.size, f.intervals))
            self._undispatched += sum(b - a for a, b in f.gaps)
        return skipped

    # ----------------------------------------------------------------------------- workers

    def _cut(self) -> tuple[_File, int, int] | None:
        """The next range to fetch, or None when nothing is waiting. Call with the lock held.

        Files are taken in order, with ranges alternating between the first FILES_IN_FLIGHT
        that still have gaps: writers to one file queue on its inode lock (and spin on a CPU
        while they wait), and each hasher has a file growing under it.
        """
        while self._first_open < len(self._files) and not self._files[self._first_open].gaps:
            self._first_open += 1
        open_files: list[_File] = []
        for f in itertools.islice(self._files, self._first_open, None):
            if f.gaps:
                open_files.append(f)
                if len(open_files) == FILES_IN_FLIGHT:
                    break
        if open_files:
            self._turn += 1
            f = open_files[self._turn % len(open_files)]
            start, end = f.gaps[0]
            size = self._range
            if self.tuning.range_size is None and self._undispatched < size * self._target:
                size = max(TAIL_RANGE, self._undispatched // max(1, self._target))
            if end - start <= size + size // 4:
                f.gaps.popleft()
                stop_at = end
            else:
                stop_at = start + size
                f.gaps[0] = (stop_at, end)
            self._undispatched -= stop_at - start
            return f, start, stop_at
        return None

    def _worker(self, index: int) -> None:
        buf = memoryview(bytearray(self.tuning.buffer_size))
        try:
            while True:
                with self._lock:
                    job = None
                    while not self._stop.is_set():
                        if index < self._target:
                            job = self._cut()
                            if job is not None:
                                break
                        self._lock.wait(0.5)
                    if job is None:
                        return
                try:
                    self._fetch(index, buf, *job)
                except PrefetchError as exc:
                    self._fail(exc)
                    return
                except Exception as exc:  # a bug must stop the download, not hang it
                    self._fail(PrefetchError(f"{job[0].what}: {type(exc).__name__}: {exc}"))
                    return
        finally:
            self._conns.close_all()

    def _fetch(self, index: int, buf: memoryview, f: _File, start: int, end: int) -> None:
        pos = start
        attempt = 0

        def advance(n: int) -> None:
            nonlocal pos
            pos += n
            self._worker_bytes[index] += n

        while pos < end:
            begun = pos
            try:
                fetch_range(
                    self._conns,
                    f.obj.url,
                    f.obj.headers,
                    pos,
                    end - pos,
                    f.obj.size,
                    f.fd,
                    buf,
                    advance,
                    self._stop,
                    f.what,
                )
            except RetryableError as exc:
                self._complete(f, begun, pos)
                if self._stop.is_set():
                    return
                attempt += 1
                if attempt > self.tuning.retries:
                    raise TransferError(
                        f"{exc} (gave up after {self.tuning.retries} retries of this range)"
                    ) from exc
                delay = min(self.tuning.max_backoff_s, self.tuning.backoff_s * 2 ** (attempt - 1))
                log.info("%s; retrying bytes %d-%d in %.2fs", exc, pos, end - 1, delay)
                if self._stop.wait(delay * (0.5 + random.random() / 2)):
                    return
                continue
            except BaseException:
                self._complete(f, begun, pos)
                raise
            self._complete(f, begun, pos)

    def _complete(self, f: _File, start: int, end: int) -> None:
        if end <= start:
            return
        with self._lock:
            f.intervals = add_interval(f.intervals, start, end)
            f.fetched += end - start
            self._lock.notify_all()

    def _fail(self, exc: PrefetchError) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = exc
            self._stop.set()
            self._lock.notify_all()
        self._conns.abort_all()

    def _set_target(self, target: int) -> None:
        target = max(1, min(self.tuning.max_connections, target))
        with self._lock:
            self._target = target
            while len(self._workers) < target:
                self._worker_bytes.append(0)
                thread = threading.Thread(
                    target=self._worker,
                    args=(len(self._workers),),
                    name=f"prefetch-{len(self._workers)}",
                    daemon=True,
                )
                self._workers.append(thread)
                thread.start()
            self._lock.notify_all()

    # ----------------------------------------------------------------------------- hashing

    def _next_to_hash(self) -> _File | None:
        with self._lock:
            if self._hash_next >= len(self._files):
                return None
            f = self._files[self._hash_next]
            self._hash_next += 1
            return f

    def _hasher(self) -> None:
        """Take files in order and hash each as its completed prefix grows.

        HASHERS threads do this, so the files still to hash when the last byte arrives are
        hashed on every core. The bytes are read through short-lived read-only mappings of the
        page cache, one HASH_CHUNK window at a time, so they never add up in memory. Reading
        them back with ``pread`` into a small buffer instead cost a quarter more system CPU per
        byte inside a running download (the copy, on top of the receiving).
        """
        try:
            while (f := self._next_to_hash()) is not None:
                while True:
                    with self._lock:
                        while not self._stop.is_set() and (
                            prefix_end(f.intervals) <= f.digests.position
                            and f.digests.position < f.obj.size
                        ):
                            self._lock.wait(0.5)
                        if self._stop.is_set():
                            return
                        ready = prefix_end(f.intervals)
                        digests = f.digests
                    if digests.position >= f.obj.size:
                        if self._finalize(f):
                            break
                        continue
                    position = digests.position
                    base = position - position % mmap.ALLOCATIONGRANULARITY
                    end = min(ready, base + HASH_CHUNK)
                    with mmap.mmap(f.fd, end - base, prot=mmap.PROT_READ, offset=base) as view:
                        view.madvise(mmap.MADV_SEQUENTIAL)
                        with memoryview(view) as whole, whole[position - base :] as chunk:
                            digests.update(chunk)
        except PrefetchError as exc:
            self._fail(exc)
        except (OSError, ValueError) as exc:
            self._fail(PrefetchError(f"verifying: {exc}"))

    def _finalize(self, f: _File) -> bool:
        """Verify a whole file and move it into place; False when it must be fetched again."""
        try:
            if covered(f.intervals) != f.obj.size or os.fstat(f.fd).st_size != f.obj.size:
                raise VerificationError(
                    f"{f.what}: wrote {covered(f.intervals)} of {f.obj.size} bytes"
                )
            sha256, verified = f.digests.finish(f.what)
            if f.obj.path.endswith(".safetensors"):
                check_safetensors(f.fd, f.obj.size, f.what)
                verified.append("safetensors-header")
        except VerificationError as exc:
            if f.verify_attempts >= self.tuning.checksum_retries:
                with contextlib.suppress(OSError):
                    os.close(f.fd)
                    f.part.unlink()
                f.fd = -1
                raise
            f.verify_attempts += 1
            log.warning("%s; fetching the whole file again", exc)
            with self._lock:
                f.intervals = []
                f.digests = Digests(f.obj.checksums, self.tuning.sha256)
                f.gaps = deque([(0, f.obj.size)])
                self._undispatched += f.obj.size
                self._first_open = 0
                self._lock.notify_all()
            return False
        try:
            if self.tuning.fsync:
                os.fsync(f.fd)
            os.close(f.fd)
            f.fd = -1
            f.final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f.part, f.final)
        except OSError as exc:
            raise disk_error(exc, f.what) from exc
        result = FileResult(f.obj.path, f.obj.size, sha256, verified, f.fetched, False)
        with self._lock:
            f.result = result
            self.manifest.record(result, f.obj.identity(), self.source)
            self._finished += 1
            self._lock.notify_all()
        return True

    # ----------------------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        """Completed ranges of every unfinished file, as saved in the sidecar and heartbeats."""
        with self._lock:
            files = {
                f.obj.path: (f.obj.identity(), list(f.intervals))
                for f in self._files
                if f.result is None and f.intervals
            }
        return ranges_json(files)

    def _save_state(self) -> None:
        snapshot = self.state()
        if self.tuning.fsync:
            for f in self._files:
                fd = f.fd
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.fdatasync(fd)
        write_json_atomic(self.dest / STATE_DIR / PROGRESS, snapshot, fsync=False)
        if self.on_state is not None:
            self.on_state(snapshot)

    def stop(self) -> None:
        """Ask a running download to stop; ``run`` raises ``PrefetchError`` after saving state."""
        self._fail(PrefetchError("the download was cancelled"))

    # ----------------------------------------------------------------------------- run

    def run(self) -> PrefetchResult:
        began = time.monotonic()
        try:
            skipped = self._prepare()
        except OSError as exc:
            raise disk_error(exc, str(self.dest)) from exc
        total = sum(o.size for o in self._objects)
        hashers = [
            threading.Thread(target=self._hasher, name=f"prefetch-hash-{n}", daemon=True)
            for n in range(HASHERS)
        ]
        for thread in hashers:
            thread.start()
        self._set_target(self._target)
        auto = self.tuning.connections is None
        best_rate = 0.0
        flat_windows = 0
        settled = not auto
        last_bytes, last_t, last_save = 0, began, began
        rate = 0.0
        try:
            while True:
                with self._lock:
                    if self._finished == len(self._files) or self._stop.is_set():
                        break
                    self._lock.wait(WINDOW_S / 5)
                now = time.monotonic()
                fetched = sum(self._worker_bytes)
                if now - last_t >= WINDOW_S:
                    window = (fetched - last_bytes) / (now - last_t)
                    rate = window if rate == 0 else 0.5 * rate + 0.5 * window
                    last_bytes, last_t = fetched, now
                    self._retune(window)
                    if not settled and fetched > 0:
                        if window > best_rate * GAIN and self._undispatched > 0:
                            best_rate = window
                            flat_windows = 0
                            self._set_target(self._target + CONNECTION_STEP)
                        elif best_rate > 0:
                            flat_windows += 1
                            settled = flat_windows >= 2
                    self._report(total, skipped, fetched, rate, now - began)
                if now - last_save >= self.tuning.state_interval_s:
                    last_save = now
                    self._save_state()
        finally:
            self._stop.set()
            with self._lock:
                self._lock.notify_all()
            if self._finished < len(self._files):  # interrupted: unblock waiting sockets
                self._conns.abort_all()
            for thread in self._workers:
                thread.join()
            for thread in hashers:
                thread.join()
            if self._finished < len(self._files):
                self._save_state()
            for f in self._files:
                if f.fd >= 0:
                    os.close(f.fd)
                    f.fd = -1
            self.manifest.save(self.tuning.fsync)
        if self._failure is not None:
            raise self._failure
        self._finish_dirs()
        fetched = sum(self._worker_bytes)
        elapsed = time.monotonic() - began
        self._report(total, skipped, fetched, fetched / elapsed if elapsed else 0.0, elapsed)
        results = skipped + [f.result for f in self._files if f.result is not None]
        return PrefetchResult(
            destination=str(self.dest),
            files=sorted(results, key=lambda r: r.path),
            total_bytes=total,
            fetched_bytes=fetched,
            resumed_bytes=self.resumed_bytes,
            seconds=elapsed,
            connections=self._target,
            range_size=self._range,
        )

    def _retune(self, window_rate: float) -> None:
        """Size ranges so one takes about RANGE_SECONDS at the measured per-connection rate."""
        if self.tuning.range_size is not None or window_rate <= 0:
            return
        per_connection = window_rate / max(1, self._target)
        size = int(per_connection * RANGE_SECONDS) // MiB * MiB
        self._range = max(MIN_RANGE, min(MAX_RANGE, size))

    def _report(
        self, total: int, skipped: list[FileResult], fetched: int, rate: float, elapsed: float
    ) -> None:
        if self.on_progress is None:
            return
        with self._lock:
            # Bytes of ranges still in flight count too, so the bar moves smoothly; bytes
            # fetched twice after a retry can only overstate it until the end, so cap it.
            done = sum(r.size for r in skipped) + self.resumed_bytes + fetched
            done = min(total, done)
            files_done = len(skipped) + self._finished
        self.on_progress(
            Progress(
                total_bytes=total,
                done_bytes=done,
                fetched_bytes=fetched,
                files_total=len(self._objects),
                files_done=files_done,
                bytes_per_s=rate,
                connections=self._target,
                elapsed_s=elapsed,
            )
        )

    def _finish_dirs(self) -> None:
        state_dir = self.dest / STATE_DIR
        with contextlib.suppress(OSError):
            (state_dir / PROGRESS).unlink()
        with contextlib.suppress(OSError):
            shutil.rmtree(state_dir / PARTIAL)
        if not self.tuning.fsync:
            return
        for directory in {f.final.parent for f in self._files} | {state_dir}:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
