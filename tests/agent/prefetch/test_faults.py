"""The engine against an origin that misbehaves: resets, 5xx, short bodies, corrupted bytes,
refusals, missing keys, a full disk, and a process killed mid-download then resumed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.prefetch import (
    AuthError,
    DiskFullError,
    NotFoundError,
    SourceOptions,
    TransferError,
    VerificationError,
    prefetch,
)
from agent.prefetch.model import RemoteObject
from agent.prefetch.parts import memory_backed
from agent.prefetch.state import STATE_DIR, covered, parse_ranges, ranges_json
from tests.agent.prefetch.conftest import fast_tuning, safetensors_bytes, small_tmpfs
from tests.agent.prefetch.faults import Fault, FaultyOrigin

MiB = 1024 * 1024


def _fetch(origin: FaultyOrigin, dest: Path, names: list[str], **tuning: object) -> object:
    return prefetch(origin.base, dest, SourceOptions(files=names), fast_tuning(**tuning))


@pytest.mark.parametrize(
    "fault",
    [
        Fault("reset", times=3, after=100_000),
        Fault("status", times=2, status=503),
        Fault("status", times=2, status=500),
        Fault("truncate", times=3, after=10_000),
    ],
    ids=["reset-mid-range", "503-then-ok", "500-then-ok", "truncated-body"],
)
def test_transient_faults_are_retried(
    origin: FaultyOrigin, tmp_path: Path, fault: Fault, body_path: str
) -> None:
    data = os.urandom(2 * MiB + 5)
    origin.add("w.bin", data, Fault(fault.kind, fault.times, fault.after, fault.status, skip=2))
    result = _fetch(origin, tmp_path, ["w.bin"])
    assert (tmp_path / "w.bin").read_bytes() == data
    assert origin.injected[fault.kind] == fault.times
    # A retried range asks only for what it had not yet written. A reset may discard bytes
    # the server had sent but the client had not read; a clean short body loses nothing.
    resent = origin.served["w.bin"] - len(data)
    if fault.kind == "reset":
        assert 0 <= resent <= (fault.times or 0) * fault.after
    else:
        assert resent == 0
    assert result.fetched_bytes == len(data)  # type: ignore[attr-defined]


def test_transient_fault_that_never_ends_gives_up(origin: FaultyOrigin, tmp_path: Path) -> None:
    origin.add("w.bin", os.urandom(MiB), Fault("status", times=None, status=503, skip=1))
    with pytest.raises(TransferError, match=r"503.*gave up after 2 retries"):
        _fetch(origin, tmp_path, ["w.bin"], retries=2)
    assert not (tmp_path / "w.bin").exists()


def test_corruption_once_refetches_the_file(origin: FaultyOrigin, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    origin.add("w.bin", data, Fault("corrupt", times=1, skip=1))
    names = [f"w.bin {hashlib.sha256(data).hexdigest()}"]
    _fetch(origin, tmp_path, names)
    assert (tmp_path / "w.bin").read_bytes() == data
    assert origin.served["w.bin"] == 2 * len(data)


def test_persistent_corruption_fails_verification(origin: FaultyOrigin, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    origin.add("w.bin", data, Fault("corrupt", times=None))
    with pytest.raises(VerificationError, match="sha256 mismatch"):
        _fetch(origin, tmp_path, [f"w.bin {hashlib.sha256(data).hexdigest()}"])
    assert not (tmp_path / "w.bin").exists()
    assert not (tmp_path / STATE_DIR / "partial" / "w.bin.part").exists()


def test_broken_safetensors_header_fails_verification(origin: FaultyOrigin, tmp_path: Path) -> None:
    good = safetensors_bytes({"w": 1000})
    origin.add("ok.safetensors", good)
    bad = bytearray(safetensors_bytes({"w": 1000}))
    bad[8:12] = b"XXXX"  # the JSON header no longer parses
    origin.add("bad.safetensors", bytes(bad))
    result = _fetch(origin, tmp_path / "a", ["ok.safetensors"])
    assert "safetensors-header" in result.files[0].verified_with  # type: ignore[attr-defined]
    with pytest.raises(VerificationError, match="safetensors header is not JSON"):
        _fetch(origin, tmp_path / "b", ["bad.safetensors"])
    short = safetensors_bytes({"w": 1000})[:-4]
    origin.add("short.safetensors", short)
    with pytest.raises(VerificationError, match="data_offsets"):
        _fetch(origin, tmp_path / "c", ["short.safetensors"])


def test_forbidden_is_an_auth_error(origin: FaultyOrigin, tmp_path: Path) -> None:
    origin.add("w.bin", os.urandom(MiB), Fault("status", times=None, status=403))
    with pytest.raises(AuthError, match="403"):
        _fetch(origin, tmp_path, ["w.bin"])


def test_missing_key_is_not_found(origin: FaultyOrigin, tmp_path: Path) -> None:
    origin.add("here.bin", b"x" * 10)
    with pytest.raises(NotFoundError, match=r"gone\.bin"):
        _fetch(origin, tmp_path, ["here.bin", "gone.bin"])


def test_key_deleted_after_listing_is_not_found(origin: FaultyOrigin, tmp_path: Path) -> None:
    origin.add("w.bin", os.urandom(MiB), Fault("status", times=None, status=404))
    with pytest.raises(NotFoundError, match=r"w\.bin"):
        _fetch(origin, tmp_path, ["w.bin"])


def test_full_disk(origin: FaultyOrigin, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", 2) as small:
        origin.add("w.bin", os.urandom(3 * MiB))
        with pytest.raises(DiskFullError, match=r"bytes free|no space"):
            _fetch(origin, small / "model", ["w.bin"])
        assert origin.served["w.bin"] == 0


@pytest.mark.parametrize("saved", [False, True], ids=["nothing-saved", "half-saved"])
def test_rerun_counts_what_the_part_file_already_holds(
    origin: FaultyOrigin, tmp_path: Path, saved: bool
) -> None:
    """A run that died on a full disk left a part file holding 3 MiB (more than its progress
    says, or with no progress at all); with 1 MiB free the rerun fits all the same: those
    blocks are rewritten in place, or given back when the part file starts over."""
    with small_tmpfs(tmp_path / "small", 4) as small:
        data = os.urandom(3 * MiB)
        origin.add("w.bin", data)
        state = small / "model" / STATE_DIR
        (state / "partial").mkdir(parents=True)
        (state / "partial" / "w.bin.part").write_bytes(data[: 2 * MiB] + bytes(MiB))
        if saved:
            key = RemoteObject(path="w.bin", size=len(data), url="").resume_key()
            ranges = ranges_json({"w.bin": (key, [(0, 3 * MiB // 2)])})
            (state / "progress.json").write_text(json.dumps(ranges))
        assert os.statvfs(small).f_bavail * os.statvfs(small).f_frsize < len(data)
        result = _fetch(origin, small / "model", ["w.bin"])
        assert (small / "model" / "w.bin").read_bytes() == data
        assert result.resumed_bytes == (3 * MiB // 2 if saved else 0)  # type: ignore[attr-defined]
        assert origin.served["w.bin"] == len(data) - result.resumed_bytes  # type: ignore[attr-defined]


def test_tmpfs_destination_is_sized_but_not_zero_filled(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "small", 8) as small:
        assert memory_backed(small)
        assert not memory_backed(small / "missing")
        data = os.urandom(3 * MiB)
        origin.add("w.bin", data)
        origin.rate = 1 * MiB  # per connection, so the download is still running below
        seen: list[tuple[int, int]] = []

        def look(_: object) -> None:
            parts = list((small / "model" / STATE_DIR).rglob("*.part"))
            if parts and not seen:
                st = parts[0].stat()
                seen.append((st.st_size, st.st_blocks * 512))

        result = prefetch(
            origin.base, small / "model", SourceOptions(files=["w.bin"]),
            fast_tuning(connections=2), on_progress=look,
        )  # fmt: skip
        assert (small / "model" / "w.bin").read_bytes() == data
        assert result.fetched_bytes == len(data)
        # The part file had its full size from the start, but only the bytes received so far
        # took memory: nothing was zero-filled ahead of the download.
        assert seen, "no progress was reported while the download ran"
        size, allocated = seen[0]
        assert size == len(data)
        assert allocated < len(data)


def test_killed_process_resumes_without_refetching_saved_ranges(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    data = os.urandom(8 * MiB)
    origin.add("big.bin", data)
    origin.rate = 512 * 1024  # per connection: about four seconds for the whole file
    progress = tmp_path / STATE_DIR / "progress.json"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spillway",
            "prefetch",
            origin.base,
            str(tmp_path),
            "--file",
            "big.bin",
            "--connections",
            "4",
            "--range-size",
            "256K",
            "--no-fsync",
            "--json",
        ],
        cwd=Path(__file__).resolve().parents[3],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    saved = 0
    while saved < 2 * MiB:
        assert time.monotonic() < deadline, "no progress was saved"
        assert child.poll() is None, "the download finished before it could be killed"
        entries = parse_ranges(json.loads(progress.read_text()) if progress.exists() else {})
        saved = sum(covered(r) for _, r in entries.values())
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    recorded = parse_ranges(json.loads(progress.read_text()))
    recorded_bytes = covered(recorded["big.bin"][1])
    assert 0 < recorded_bytes < len(data)

    origin.rate = None
    origin.wait_idle()
    first_served = origin.served["big.bin"]
    origin.reset_counts()
    result = _fetch(origin, tmp_path, ["big.bin"])
    assert (tmp_path / "big.bin").read_bytes() == data
    assert result.resumed_bytes == recorded_bytes  # type: ignore[attr-defined]
    # The second run fetches exactly what the sidecar did not record ...
    assert origin.served["big.bin"] == len(data) - recorded_bytes
    # ... so what was fetched twice is what the first run got after its last save.
    fetched_twice = first_served + origin.served["big.bin"] - len(data)
    assert fetched_twice == first_served - recorded_bytes
    assert fetched_twice < 4 * 256 * 1024 + 1 * MiB
