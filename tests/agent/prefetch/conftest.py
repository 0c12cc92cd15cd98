"""Fixtures for prefetch tests: the fault-injecting origin, nginx serving a directory, and
helpers that build model-shaped test data (random shards, safetensors files)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.prefetch import Tuning, transport
from tests.agent.prefetch.faults import FaultyOrigin

KiB = 1024


def fast_tuning(**overrides: object) -> Tuning:
    """Small ranges (so a few MB become many ranges), quick retries, no fsync wait."""
    fields: dict[str, object] = {
        "connections": 4,
        "range_size": 256 * KiB,
        "buffer_size": 64 * KiB,
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "timeout_s": 10.0,
        "state_interval_s": 0.1,
    }
    fields.update(overrides)
    return Tuning(**fields)  # type: ignore[arg-type]


@contextmanager
def small_tmpfs(where: Path, mib: int) -> Iterator[Path]:
    """A ``mib`` MiB tmpfs mounted at ``where`` for the block; skips the test without root."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {mib} MiB tmpfs here (needs root): {mounted.stderr.decode()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} in {timeout}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def safetensors_bytes(tensors: dict[str, int]) -> bytes:
    """A valid safetensors file with one F32 vector per entry (name -> element count)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, count in tensors.items():
        header[name] = {
            "dtype": "F32",
            "shape": [count],
            "data_offsets": [offset, offset + count * 4],
        }
        offset += count * 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + os.urandom(offset)


@pytest.fixture(params=["splice", "buffer"])
def body_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with each way of moving a body into the file."""
    path: str = request.param
    if path == "splice" and not hasattr(os, "splice"):
        pytest.skip("os.splice needs Linux")
    monkeypatch.setattr(transport, "_SPLICE", path == "splice")
    return path


@pytest.fixture
def origin() -> Iterator[FaultyOrigin]:
    server = FaultyOrigin()
    try:
        yield server
    finally:
        server.close()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
    )


class Nginx:
    def __init__(self, root: Path, work: Path) -> None:
        binary = nginx_binary()
        if binary is None:
            pytest.skip("nginx is not installed (apt-get install nginx-light); .ci/run installs it")
        self.root = root
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/"
        temp = work / "tmp"
        temp.mkdir(parents=True, exist_ok=True)
        conf = work / "nginx.conf"
        temps = "".join(
            f"  {kind}_temp_path {temp};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf.write_text(
            "daemon off;\nworker_processes 1;\n"
            # As root nginx would serve as nobody, who cannot read pytest's private temp dirs.
            + ("user root;\n" if os.geteuid() == 0 else "")
            + f"pid {work / 'nginx.pid'};\nerror_log {work / 'error.log'};\n"
            "events { worker_connections 256; }\n"
            "http {\n  access_log off;\n  sendfile on;\n" + temps + f"  server {{ listen "
            f"127.0.0.1:{self.port}; root {root}; }}\n}}\n"
        )
        self.process = subprocess.Popen(
            [binary, "-c", str(conf), "-e", str(work / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.process, "nginx")


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    root = tmp_path_factory.mktemp("www")
    server = Nginx(root, tmp_path_factory.mktemp("nginx"))
    try:
        yield server
    finally:
        stop(server.process)
