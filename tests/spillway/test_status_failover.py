"""``spillway status`` with several schedulers: it asks them in order and shows the first that
answers; when none does it names each with its error."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

from tests.conftest import SchedulerFactory, Tokens, write_yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def spillway(*args: str) -> tuple[int, str, str]:
    """The command as a real process, without blocking the schedulers in this event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spillway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_status_tries_the_schedulers_in_order(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path
) -> None:
    live = await start_scheduler()
    dead = f"127.0.0.1:{free_port()}"
    token = tokens.write("oncall", tmp_path)
    address = f"127.0.0.1:{live.port}"
    code, out, err = await spillway(
        "status", "--scheduler", dead, "--scheduler", address, "--token-file", str(token), "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["answered_by"] == address
    assert data["scheduler_instance"] == live.instance

    # The list of a gateway's (or an agent's) config, with its own TLS settings (none here).
    config = write_yaml(
        tmp_path / "gateway.yaml",
        {
            "gateway_id": "gw-1",
            "policy_file": "policy.yaml",
            "scheduler": {"addresses": [dead, address], "token_file": "gw.token"},
        },
    )
    code, out, err = await spillway(
        "status", "--config", str(config), "--token-file", str(token), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["answered_by"] == address
    code, out, err = await spillway("status", "--config", str(config), "--token-file", str(token))
    assert code == 0, err
    assert f"scheduler {live.instance} at {address}" in out

    # None answers: one line naming each.
    other = f"127.0.0.1:{free_port()}"
    code, out, err = await spillway(
        "status", "--scheduler", dead, "--scheduler", other, "--token-file", str(token)
    )
    assert code == 1
    (line,) = err.strip().splitlines()
    assert f"scheduler {dead}: UNAVAILABLE" in line and f"scheduler {other}: UNAVAILABLE" in line

    # Bad lists are bad input.
    code, _, err = await spillway(
        "status", "--scheduler", address, "--scheduler", address, "--token-file", str(token)
    )
    assert code == 2 and "listed twice" in err
    broken = write_yaml(
        tmp_path / "broken.yaml", {"scheduler": {"addresses": [], "token_file": "t"}}
    )
    code, _, err = await spillway("status", "--config", str(broken), "--token-file", str(token))
    assert code == 2 and f"{broken}:" in err and "scheduler.addresses" in err
