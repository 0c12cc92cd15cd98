"""Replica processes: start in their own process group, find again after an agent restart,
and stop with SIGTERM to the group, a monotonic deadline, then SIGKILL.

A process the agent started itself is watched through its ``Popen``; one adopted from an
earlier agent is watched by pid plus its kernel start time (``/proc/<pid>/stat``), so that a
recycled pid is never mistaken for the replica. This module knows nothing about health or
replicas' meaning; the supervisor does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot); None if it is gone or a
    zombie, or on a system without ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class ReplicaProcess:
    """One inference server process and its process group."""

    def __init__(self, pid: int, started: int | None, popen: subprocess.Popen[bytes] | None):
        self.pid = pid
        self.pgid = pid  # start_new_session makes the child the leader of its own group
        self.started = started
        self._popen = popen
        self._returncode: int | None = None

    @classmethod
    def spawn(cls, command: Sequence[str], env: Mapping[str, str], log: Path) -> ReplicaProcess:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(command),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(popen.pid, start_time(popen.pid), popen)

    @classmethod
    def adopt(cls, pid: int, started: int | None) -> ReplicaProcess | None:
        """The process an earlier agent started, if it still runs (same pid, same start)."""
        now = start_time(pid)
        if now is None or started is None or now != started:
            return None
        return cls(pid, started, None)

    @property
    def adopted(self) -> bool:
        return self._popen is None

    def alive(self) -> bool:
        if self._popen is not None:
            self._returncode = self._popen.poll()
            return self._returncode is None
        return start_time(self.pid) == self.started

    @property
    def exit_reason(self) -> str:
        """How the process ended, for people: ``exit code 1``, ``killed by SIGKILL``."""
        code = self._returncode
        if code is None:
            return "exited (code unknown: the process was adopted)" if self.adopted else "running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    async def wait(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait until the process is gone; False if it still runs after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def terminate(self, grace_s: float) -> str:
        """SIGTERM to the group, wait up to ``grace_s`` (monotonic), then SIGKILL the group.
        Returns how it ended."""
        self.signal_group(signal.SIGTERM)
        if await self.wait(grace_s):
            self.signal_group(signal.SIGKILL)  # children left behind in the group
            return self.exit_reason
        self.signal_group(signal.SIGKILL)
        await self.wait(10.0)
        return f"killed by SIGKILL after {grace_s:g}s"
