"""An object that changes at the origin while it is being fetched, or between a killed run and
its resumption, against the fault-injecting origin: with an ETag, or only a Last-Modified date,
at an origin that honours ``If-Range`` and at one that ignores it (as S3-compatible stores do).
The result is always the new version, byte for byte, or exit code 7; never a mix of both."""

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

from agent.prefetch import OriginChangedError, PrefetchResult, SourceOptions, prefetch
from agent.prefetch.state import STATE_DIR, covered, parse_ranges
from tests.agent.prefetch.conftest import fast_tuning
from tests.agent.prefetch.faults import Fault, FaultyOrigin

ROOT = Path(__file__).resolve().parents[3]
MiB = 1024 * 1024
VALIDATORS = {"etag": {"etag": True}, "last-modified": {"last_modified": True}}


def _fetch(origin: FaultyOrigin, dest: Path, name: str) -> PrefetchResult:
    return prefetch(origin.base, dest, SourceOptions(files=[name]), fast_tuning())


@pytest.mark.parametrize("if_range", [True, False], ids=["honours-if-range", "ignores-if-range"])
@pytest.mark.parametrize("validator", list(VALIDATORS))
def test_object_changed_mid_download_ends_as_the_new_version(
    origin: FaultyOrigin, tmp_path: Path, validator: str, if_range: bool, body_path: str
) -> None:
    old, new = os.urandom(4 * MiB), os.urandom(4 * MiB)
    # Five ranges of the old version arrive, then the object is replaced (same size). The file
    # list names no checksum, so only the validators can tell the versions apart.
    change = Fault("change", skip=5, data=new)
    origin.add("w.bin", old, change, if_range=if_range, **VALIDATORS[validator])
    result = _fetch(origin, tmp_path, "w.bin")
    assert origin.injected["change"] == 1
    assert (tmp_path / "w.bin").read_bytes() == new
    assert result.files[0].sha256 == hashlib.sha256(new).hexdigest()
    assert result.resumed_bytes == 0
    assert not (tmp_path / STATE_DIR / "partial").exists()
    # The manifest names the new version, so a second run fetches nothing ...
    again = _fetch(origin, tmp_path, "w.bin")
    assert again.fetched_bytes == 0
    # ... and one after yet another change fetches it anew.
    newer = os.urandom(4 * MiB)
    origin.replace("w.bin", newer)
    _fetch(origin, tmp_path, "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == newer


def test_object_changed_to_another_size(origin: FaultyOrigin, tmp_path: Path) -> None:
    old, new = os.urandom(3 * MiB), os.urandom(2 * MiB + 7)
    origin.add("w.bin", old, Fault("change", skip=3, data=new), etag=True)
    result = _fetch(origin, tmp_path, "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == new
    assert result.total_bytes == len(new)
    assert [f.size for f in result.files] == [len(new)]


def test_change_is_caught_by_size_alone_without_validators(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # An origin with neither ETag nor Last-Modified: a new size in Content-Range still shows.
    old, new = os.urandom(3 * MiB), os.urandom(3 * MiB + 1)
    origin.add("w.bin", old, Fault("change", skip=3, data=new))
    _fetch(origin, tmp_path, "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == new


def test_several_files_change_at_once(origin: FaultyOrigin, tmp_path: Path) -> None:
    names = [f"shard-{n}.bin" for n in range(4)]
    news = {name: os.urandom(MiB + n) for n, name in enumerate(names)}
    for n, name in enumerate(names):
        origin.add(name, os.urandom(MiB + n), Fault("change", skip=1, data=news[name]), etag=True)
    prefetch(origin.base, tmp_path, SourceOptions(files=names), fast_tuning())
    for name in names:
        assert (tmp_path / name).read_bytes() == news[name], name


def test_object_that_keeps_changing_fails_with_origin_changed(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # Every request after the first two finds a new version (of the same bytes, as a re-upload
    # of the same file gives them: new ETag, same content).
    data = os.urandom(2 * MiB)
    origin.add("w.bin", data, Fault("change", times=None, skip=2, data=data), etag=True)
    with pytest.raises(OriginChangedError, match=r"w\.bin: .*changed 4 times"):
        _fetch(origin, tmp_path, "w.bin")
    assert not (tmp_path / "w.bin").exists()


def test_cli_exit_code_7_for_an_object_that_keeps_changing(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    data = os.urandom(MiB)
    origin.add("w.bin", data, Fault("change", times=None, data=data), last_modified=True)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "spillway", "prefetch", origin.base, str(tmp_path / "m")),
            *("--file", "w.bin", "--range-size", "256K", "--json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 7, done.stderr
    answer = json.loads(done.stdout)
    assert answer["error"] == "origin_changed"
    assert answer["exit_code"] == 7
    # Each restart is logged as a warning; the failure itself is one line, the last.
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1].startswith("spillway: origin changed: w.bin: ")
    assert sum("fetching the new version" in line for line in lines) == 3
    assert not (tmp_path / "m" / "w.bin").exists()


def _kill_mid_download(origin: FaultyOrigin, dest: Path, name: str) -> dict[str, object]:
    """Run the CLI until it has saved at least 2 MiB of progress, SIGKILL it, and return the
    progress it left."""
    progress = dest / STATE_DIR / "progress.json"
    child = subprocess.Popen(
        [
            *(sys.executable, "-m", "spillway", "prefetch", origin.base, str(dest)),
            *("--file", name, "--connections", "4", "--range-size", "256K", "--no-fsync"),
            "--json",
        ],
        cwd=ROOT,
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
    origin.rate = None
    origin.wait_idle()
    raw: dict[str, object] = json.loads(progress.read_text())
    return raw


@pytest.mark.parametrize("validator", list(VALIDATORS))
def test_change_between_kill_and_resume_fetches_the_new_version(
    origin: FaultyOrigin, tmp_path: Path, validator: str
) -> None:
    old, new = os.urandom(8 * MiB), os.urandom(8 * MiB)
    origin.add("big.bin", old, **VALIDATORS[validator])
    origin.rate = 512 * 1024  # per connection: about four seconds for the whole file
    saved = _kill_mid_download(origin, tmp_path, "big.bin")
    # The progress records the validator the saved ranges were fetched under.
    etag, modified = origin.validators("big.bin")
    identity = parse_ranges(saved)["big.bin"][0]
    assert (f"etag={etag}" if etag else f"last-modified={modified}") in identity

    origin.replace("big.bin", new)  # same size, new validator
    origin.reset_counts()
    result = _fetch(origin, tmp_path, "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == new
    # Not one saved range was trusted: the fresh listing no longer matched them.
    assert result.resumed_bytes == 0
    assert origin.served["big.bin"] == len(new)


def test_unchanged_object_still_resumes(origin: FaultyOrigin, tmp_path: Path) -> None:
    data = os.urandom(8 * MiB)
    origin.add("big.bin", data, etag=True, last_modified=True)
    origin.rate = 512 * 1024
    saved = parse_ranges(_kill_mid_download(origin, tmp_path, "big.bin"))
    origin.reset_counts()
    result = _fetch(origin, tmp_path, "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == data
    assert result.resumed_bytes == covered(saved["big.bin"][1]) > 0
    assert origin.served["big.bin"] == len(data) - result.resumed_bytes
