"""The parallel byte-range download engine.

Given resolved objects and a destination directory, it keeps many ranges in flight across and
within files (small files whole, large ones cut into ranges sized from the measured
per-connection rate), writes each range at its offset into a preallocated ``.part`` file
(sized but not reserved on tmpfs, where reserving means zero-filling),
retries each range with backoff, hashes each file as its prefix completes, verifies it, and only
then fsyncs and renames it into place. Completed ranges are saved in a sidecar (and handed to an
``on_state`` callback, which the Temporal activity turns into heartbeats) so a killed process or
a retried activity resumes instead of starting over.

Every range is conditional on the validators the object was listed with, and every answer is
checked against them (``transport``). When one shows the object changed at the origin, the file
is never finished from a mix of versions: its bytes are dropped, the source is listed again and
the new version fetched from the start, at most MAX_RESTARTS times per file; past that the
download fails with ``OriginChangedError``.

The engine must not know about any particular store: sources give it URLs and headers. It never
holds a file in memory: one buffer (or pipe) per connection plus one mapped window per hasher.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.prefetch.errors import (
    DiskFullError,
    NotFoundError,
    OriginChangedError,
    PrefetchError,
    TransferError,
    VerificationError,
)
from agent.prefetch.model import (
    FileResult,
    MiB,
    PrefetchResult,
    Progress,
    RemoteObject,
    Tuning,
)
from agent.prefetch.parts import PartFile, Version, fsync_dirs, prepare, reopen_part
from agent.prefetch.ranges import FILES_IN_FLIGHT, INITIAL_CONNECTIONS, ConnectionTuner, Ranges
from agent.prefetch.state import (
    PARTIAL,
    PROGRESS,
    STATE_DIR,
    add_interval,
    covered,
    prefix_end,
    ranges_json,
    write_json_atomic,
)
from agent.prefetch.transport import Connections, RetryableError, disk_error, fetch_range
from agent.prefetch.verify import Digests, check_safetensors

log = logging.getLogger("agent.prefetch")

HASH_CHUNK = 32 * MiB
HASHERS = FILES_IN_FLIGHT
WINDOW_S = 0.5
# How often one file may start over from a newer version before the download gives up.
MAX_RESTARTS = 3


class _Superseded(RetryableError):
    """The range's file moved on to a newer version while the range was in flight."""


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
        relist: Callable[[], list[RemoteObject]] | None = None,
    ) -> None:
        """``relist`` lists the source again (the objects as ``objects`` names them); without
        it, an object that changes at the origin fails the download."""
        self.dest = dest
        self.tuning = tuning or Tuning()
        self.source = source
        self.on_progress = on_progress
        self.on_state = on_state
        self._resume_hint = resume
        self._objects = objects
        self._files: list[PartFile] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._failure: PrefetchError | None = None
        self._target = self.tuning.connections or INITIAL_CONNECTIONS
        self._ranges = Ranges(self.tuning)
        self._worker_bytes: list[int] = []
        self._workers: list[threading.Thread] = []
        self._finished = 0
        self._hash_next = 0
        self._conns = Connections(self.tuning.timeout_s)
        self.resumed_bytes = 0
        self._reserve = True
        self._relist = relist
        self._relist_lock = threading.Lock()
        self._listed: dict[str, RemoteObject] = {}
        self._listed_at = float("-inf")
        self._retired: list[int] = []
        self._save_lock = threading.Lock()

    # ----------------------------------------------------------------------------- set-up

    def _prepare(self) -> list[FileResult]:
        self.manifest, planned = prepare(
            self._objects, self.dest, self._resume_hint, self.tuning.sha256
        )
        self._files = planned.files
        self.resumed_bytes = planned.resumed_bytes
        self._reserve = planned.reserve
        self._ranges.undispatched = sum(sum(b - a for a, b in f.gaps) for f in self._files)
        return planned.skipped

    # ----------------------------------------------------------------------------- workers

    def _worker(self, index: int) -> None:
        buf = memoryview(bytearray(self.tuning.buffer_size))
        try:
            while True:
                with self._lock:
                    job = None
                    while not self._stop.is_set():
                        if index < self._target:
                            job = self._ranges.cut(self._files, self._target)
                            if job is not None:
                                break
                        self._lock.wait(0.5)
                    if job is None:
                        return
                try:
                    try:
                        self._fetch(index, buf, *job)
                    except (OriginChangedError, NotFoundError) as exc:
                        self._changed(job[0], job[1], exc)
                except PrefetchError as exc:
                    self._fail(exc)
                    return
                except Exception as exc:  # a bug must stop the download, not hang it
                    self._fail(PrefetchError(f"{job[0].what}: {type(exc).__name__}: {exc}"))
                    return
        finally:
            self._conns.close_all()

    def _fetch(
        self, index: int, buf: memoryview, f: PartFile, ver: Version, start: int, end: int
    ) -> None:
        pos = start
        attempt = 0

        def advance(n: int) -> None:
            nonlocal pos
            pos += n
            self._worker_bytes[index] += n
            if f.current is not ver:
                raise _Superseded(f"{f.what}: a newer version is being fetched")

        while pos < end:
            begun = pos
            try:
                fetch_range(
                    self._conns,
                    ver.obj.url,
                    ver.headers,
                    pos,
                    end - pos,
                    ver.obj.size,
                    ver.fd,
                    buf,
                    advance,
                    self._stop,
                    f.what,
                    etag=ver.obj.etag,
                    last_modified=ver.obj.last_modified,
                )
            except RetryableError as exc:
                self._complete(f, ver, begun, pos)
                if self._stop.is_set() or f.current is not ver:
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
                self._complete(f, ver, begun, pos)
                raise
            self._complete(f, ver, begun, pos)

    def _complete(self, f: PartFile, ver: Version, start: int, end: int) -> None:
        if end <= start:
            return
        with self._lock:
            if f.current is not ver:
                return  # bytes of a version that was dropped
            f.intervals = add_interval(f.intervals, start, end)
            f.fetched += end - start
            self._lock.notify_all()

    # ----------------------------------------------------------------------------- changes

    def _changed(self, f: PartFile, ver: Version, exc: PrefetchError) -> None:
        """A range of ``ver`` found its object changed at the origin (or, with a
        ``NotFoundError``, gone: a pinned version that was replaced reads as missing).

        Unless another range saw it first, drop the file's bytes, list the source again and
        fetch the new version from the start, into a new part file: ranges of the old version
        still in flight finish into the old one, and count for nothing. Raises when the object
        is really gone, when nothing can list it again, or after MAX_RESTARTS.
        """
        gone = isinstance(exc, NotFoundError)
        with self._lock:
            if f.current is not ver or f.refreshing:
                return
            if self._relist is None or (gone and not ver.obj.version):
                raise exc
            if f.restarts >= MAX_RESTARTS:
                raise OriginChangedError(
                    f"{exc}; it changed {f.restarts + 1} times while it was being fetched, so "
                    "the download stops here (run it again once the object has settled)"
                )
            f.refreshing = True
            waiting, resumed = f.forget()
            self._ranges.undispatched -= waiting
            self.resumed_bytes -= resumed
            noticed = time.monotonic()
        try:
            # The sidecar forgets the old version's ranges before its part file is replaced.
            self._save_state()
            fresh = self._listing(noticed).get(ver.obj.path)
            if fresh is None:
                raise NotFoundError(f"{f.what}: gone from the origin while it was being fetched")
            if gone and fresh.resume_key() == ver.obj.resume_key():
                raise exc
            fd = reopen_part(f, fresh, self._reserve)
            with self._lock:
                self._retired.append(f.fd)
                f.start_over(fresh, fd)
                self._ranges.undispatched += fresh.size
                self._ranges.rewind()
                f.restarts += 1
                f.verify_attempts = 0
            log.warning("%s; fetching the new version from the start", exc)
        finally:
            with self._lock:
                f.refreshing = False
                self._lock.notify_all()

    def _listing(self, noticed: float) -> dict[str, RemoteObject]:
        """The source listed again, once for all the files whose change was noticed before."""
        assert self._relist is not None
        with self._relist_lock:
            if self._listed_at < noticed:
                self._listed = {o.path: o for o in self._relist()}
                self._listed_at = time.monotonic()
            return self._listed

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

    def _next_to_hash(self) -> PartFile | None:
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
                            f.refreshing
                            or prefix_end(f.intervals) <= f.digests.position < f.obj.size
                        ):
                            self._lock.wait(0.5)
                        if self._stop.is_set():
                            return
                        ready = prefix_end(f.intervals)
                        digests = f.digests
                        ver = f.current
                    if digests.position >= ver.obj.size:
                        if self._finalize(f, ver, digests):
                            break
                        continue
                    # When the file moves on to a newer version meanwhile, this window of the
                    # old part file (still open, its size kept) is hashed into digests that
                    # are thrown away.
                    position = digests.position
                    base = position - position % mmap.ALLOCATIONGRANULARITY
                    end = min(ready, base + HASH_CHUNK)
                    with mmap.mmap(ver.fd, end - base, prot=mmap.PROT_READ, offset=base) as view:
                        view.madvise(mmap.MADV_SEQUENTIAL)
                        with memoryview(view) as whole, whole[position - base :] as chunk:
                            digests.update(chunk)
        except PrefetchError as exc:
            self._fail(exc)
        except (OSError, ValueError) as exc:
            self._fail(PrefetchError(f"verifying: {exc}"))

    def _finalize(self, f: PartFile, ver: Version, digests: Digests) -> bool:
        """Verify a whole file and move it into place; False when it must be fetched again.

        Once every byte of ``ver`` is in, no range of it is in flight, so nothing can move the
        file to a newer version any more; one that already did makes this a no-op.
        """
        with self._lock:
            if f.current is not ver or f.digests is not digests or f.refreshing:
                return False
            written = covered(f.intervals)
        try:
            if written != f.obj.size or os.fstat(f.fd).st_size != f.obj.size:
                raise VerificationError(f"{f.what}: wrote {written} of {f.obj.size} bytes")
            sha256, verified = digests.finish(f.what)
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
                self.resumed_bytes -= f.forget()[1]
                f.start_over(f.obj, f.fd)
                self._ranges.undispatched += f.obj.size
                self._ranges.rewind()
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
                f.obj.path: (f.obj.resume_key(), list(f.intervals))
                for f in self._files
                if f.result is None and f.intervals
            }
        return ranges_json(files)

    def _save_state(self) -> None:
        """Save the completed ranges (after the bytes they claim are on disk). Where the disk
        is full the state saved before stays in force: the download goes on, and a later
        run trusts less than it could, never more. Any other error stops the download."""
        with self._save_lock:
            self._save_state_locked()

    def _save_state_locked(self) -> None:
        snapshot = self.state()
        if self.tuning.fsync:
            for f in self._files:
                fd = f.fd
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.fdatasync(fd)
        path = self.dest / STATE_DIR / PROGRESS
        try:
            write_json_atomic(path, snapshot, fsync=self.tuning.fsync)
        except OSError as exc:
            error = disk_error(exc, str(path))
            self._note(error, "the progress saved before stays in force")
            if not isinstance(error, DiskFullError):
                self._fail(error)
        if self.on_state is not None:
            self.on_state(snapshot)

    def _note(self, error: PrefetchError, consequence: str) -> None:
        """Log a failure to save state: a warning while the download runs, a detail once it
        is failing anyway (most often for the very same reason, a full disk)."""
        level = logging.DEBUG if self._failure is not None else logging.WARNING
        log.log(level, "%s; %s", error, consequence)

    def stop(self) -> None:
        """Ask a running download to stop; ``run`` raises ``PrefetchError`` after saving state."""
        self._fail(PrefetchError("the download was cancelled"))

    # ----------------------------------------------------------------------------- run

    def run(self) -> PrefetchResult:
        began = time.monotonic()
        try:
            skipped = self._prepare()
        except BaseException as exc:
            self._close_files()
            if isinstance(exc, OSError):
                raise disk_error(exc, str(self.dest)) from exc
            raise
        hashers = [
            threading.Thread(target=self._hasher, name=f"prefetch-hash-{n}", daemon=True)
            for n in range(HASHERS)
        ]
        for thread in hashers:
            thread.start()
        self._set_target(self._target)
        tuner = ConnectionTuner(auto=self.tuning.connections is None)
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
                    self._ranges.retune(window, self._target)
                    target = tuner.window(window, fetched, self._ranges.undispatched, self._target)
                    if target != self._target:
                        self._set_target(target)
                    self._report(skipped, fetched, rate, now - began)
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
            self._close_files()
            try:
                self.manifest.save(self.tuning.fsync)
            except OSError as exc:
                error = disk_error(exc, str(self.manifest.path))
                self._note(error, "the manifest saved before stays in force")
                with self._lock:
                    self._failure = self._failure or error
        if self._failure is not None:
            raise self._failure
        try:
            self._finish_dirs()
        except OSError as exc:
            raise disk_error(exc, str(self.dest)) from exc
        fetched = sum(self._worker_bytes)
        elapsed = time.monotonic() - began
        self._report(skipped, fetched, fetched / elapsed if elapsed else 0.0, elapsed)
        results = skipped + [f.result for f in self._files if f.result is not None]
        return PrefetchResult(
            destination=str(self.dest),
            files=sorted(results, key=lambda r: r.path),
            total_bytes=self._total(skipped),
            fetched_bytes=fetched,
            resumed_bytes=self.resumed_bytes,
            seconds=elapsed,
            connections=self._target,
            range_size=self._ranges.size,
        )

    def _close_files(self) -> None:
        for f in self._files:
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def _total(self, skipped: list[FileResult]) -> int:
        """All bytes of the download (a file that changed at the origin counts as it is now)."""
        with self._lock:
            return sum(r.size for r in skipped) + sum(f.obj.size for f in self._files)

    def _report(self, skipped: list[FileResult], fetched: int, rate: float, elapsed: float) -> None:
        if self.on_progress is None:
            return
        total = self._total(skipped)
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
        if self.tuning.fsync:
            fsync_dirs({f.final.parent for f in self._files} | {state_dir})
