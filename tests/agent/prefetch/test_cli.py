"""``spillway prefetch`` as a user runs it: a real process, JSON for scripts, a progress bar on
a terminal, and one exit code per kind of failure."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.prefetch.conftest import small_tmpfs
from tests.agent.prefetch.faults import Fault, FaultyOrigin

ROOT = Path(__file__).resolve().parents[3]
MiB = 1024 * 1024


def _spillway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spillway", "prefetch", *args, "--range-size", "256K"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_json_result_lists_every_file(origin: FaultyOrigin, tmp_path: Path) -> None:
    a, b = os.urandom(MiB + 1), os.urandom(1000)
    origin.add("a.bin", a)
    origin.add("b.json", b)
    listing = tmp_path / "files.txt"
    listing.write_text(f"# the model\na.bin {hashlib.sha256(a).hexdigest()}\n\nb.json\n")
    done = _spillway(origin.base, str(tmp_path / "m"), "--files-from", str(listing), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["total_bytes"] == len(a) + len(b)
    files = {f["path"]: f for f in result["files"]}
    assert files["a.bin"]["verified_with"] == ["sha256"]
    assert files["b.json"]["sha256"] == hashlib.sha256(b).hexdigest()
    assert (tmp_path / "m" / "a.bin").read_bytes() == a


def test_skip_sha256_still_checks_the_store_checksum(origin: FaultyOrigin, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    origin.add("w.bin", data, Fault("corrupt", times=None))
    entry = f"w.bin {hashlib.sha256(data).hexdigest()}"
    done = _spillway(origin.base, str(tmp_path / "bad"), "--file", entry, "--skip-sha256")
    assert done.returncode == 5, done.stderr  # the list's sha256 is the store checksum here
    origin.set_faults("w.bin")
    done = _spillway(
        origin.base, str(tmp_path / "ok"), "--file", "w.bin", "--skip-sha256", "--json"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"][0]["sha256"] == ""
    assert (tmp_path / "ok" / "w.bin").read_bytes() == data


@pytest.mark.parametrize(
    ("fault", "code", "kind"),
    [
        (Fault("status", times=None, status=404), 3, "not_found"),
        (Fault("status", times=None, status=403), 4, "auth"),
        (Fault("corrupt", times=None), 5, "verification_failed"),
        (Fault("status", times=None, status=503), 1, "failed"),
    ],
    ids=["not-found", "auth", "verification", "transfer"],
)
def test_exit_codes(
    origin: FaultyOrigin, tmp_path: Path, fault: Fault, code: int, kind: str
) -> None:
    data = os.urandom(300_000)
    origin.add("w.bin", data, fault)
    entry = f"w.bin {hashlib.sha256(data).hexdigest()}"
    done = _spillway(origin.base, str(tmp_path), "--file", entry, "--json", "--retries", "1")
    assert done.returncode == code, done.stderr
    assert json.loads(done.stdout)["error"] == kind
    assert "w.bin" in done.stderr


def test_disk_full_exit_code(origin: FaultyOrigin, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", 1) as small:
        origin.add("w.bin", os.urandom(2 * MiB))
        done = _spillway(origin.base, str(small), "--file", "w.bin")
        assert done.returncode == 6, done.stderr
        assert "disk full" in done.stderr


def test_bad_source_is_bad_input(tmp_path: Path) -> None:
    done = _spillway("ftp://example/x", str(tmp_path))
    assert done.returncode == 2
    assert "expected s3://" in done.stderr


def test_progress_bar_on_a_terminal(origin: FaultyOrigin, tmp_path: Path) -> None:
    origin.add("w.bin", os.urandom(2 * MiB))
    origin.rate = 2 * MiB
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "spillway", "prefetch", origin.base, str(tmp_path)),
            *("--file", "w.bin", "--range-size", "256K", "--connections", "2"),
        ],
        cwd=ROOT,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "160", "TERM": "xterm"},
    )
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    assert process.wait(30) == 0
    os.close(leader)
    text = screen.decode("utf-8", "replace")
    assert "MB/s" in text
    assert "1/1 files" in text
    assert "ETA" in text
    assert "2.0 MiB/2.0 MiB" in text
