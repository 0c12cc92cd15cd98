"""Temporal over mutual TLS: the dev server behind HAProxy (TCP mode), which terminates TLS and
requires a client certificate signed by the test's CA.

The control plane (in the test's event loop, from a scheduler config) and a node worker (a real
``spillway agent run`` process, from an agent config with relative paths) connect through the
proxy, and a deployment workflow starts a replica on the agent's task queue. A missing client
certificate, one from another CA, a CA that did not sign the frontend's certificate and a wrong
server name each fail at start-up with one line naming the setting: ``spillway scheduler run``
exits 2 with it, a node worker logs it once and the agent goes on reporting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity

from agent.worker import NodeWorker
from common.temporallink import TemporalLink, TemporalRefused, connect_temporal
from decisions.fleetview import ReplicaState
from scheduler.config import SchedulerConfig, TemporalSettings
from scheduler.server import Scheduler
from spillway.serve.control_plane import start_control_plane
from tests.certs import CertificateAuthority, Issued
from tests.conftest import Tokens, eventually, write_yaml
from tests.temporal import _free_port
from tests.workflows.conftest import STAND_IN_RUNTIME
from tests.workflows.test_reserved import policy
from workflows.deployment import workflow_id
from workflows.sweeper import SWEEPER_ID

SERVER_NAME = "temporal.internal"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None
    )


@dataclass
class Pki:
    directory: Path
    ca: CertificateAuthority
    client: Issued
    stranger: Issued  # a client certificate from another CA
    other_ca: CertificateAuthority


class TlsProxy:
    """HAProxy in TCP mode: TLS (h2 by ALPN) in front, verified client certificates required."""

    def __init__(self, work: Path, backend: str, pki: Pki, *, verify: bool = True) -> None:
        binary = haproxy_binary()
        if binary is None:
            pytest.skip(
                "haproxy is not installed (apt-get install haproxy); scripts/test-tools.sh "
                "installs it"
            )
        server = pki.ca.issue("frontend", server=True, dns_names=(SERVER_NAME,))
        bundle = server.bundle(work / "frontend.pem")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        conf = work / "haproxy.cfg"
        conf.write_text(
            "global\n  maxconn 512\n"
            # retries 0: a backend that is down closes the line at once, not after 3 s.
            "defaults\n  mode tcp\n  retries 0\n  timeout connect 5s\n"
            # Workers long-poll for a minute: the idle timeouts must be longer than that.
            "  timeout client 10m\n  timeout server 10m\n"
            f"frontend temporal\n  bind {self.address} ssl crt {bundle} ca-file {pki.ca.path}"
            f" verify {'required' if verify else 'none'} alpn h2\n  default_backend dev\n"
            f"backend dev\n  server dev {backend}\n"
        )
        self._log = (work / "haproxy.log").open("wb")
        self.process = subprocess.Popen(
            [binary, "-f", str(conf), "-db"], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError((work / "haproxy.log").read_text())
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("haproxy did not open its port")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "temporal-ca")
    other = CertificateAuthority(directory, "other-ca")
    return Pki(
        directory,
        ca,
        ca.issue("node", server=False),
        other.issue("node", server=False),
        other,
    )


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, temporal_address: str, pki: Pki
) -> Iterator[TlsProxy]:
    proxy = TlsProxy(tmp_path_factory.mktemp("haproxy"), temporal_address, pki)
    try:
        yield proxy
    finally:
        proxy.stop()


def tls_section(pki: Pki, **change: Any) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "ca_file": str(pki.ca.path),
        "cert_file": str(pki.client.cert),
        "key_file": str(pki.client.key),
        "server_name": SERVER_NAME,
    }
    tls.update(change)
    return {k: v for k, v in tls.items() if v is not None}


#: (case, change to the tls section, the setting the one line must name)
NO_CERT: dict[str, Any] = {"cert_file": None, "key_file": None}
BAD: list[tuple[str, dict[str, Any] | str, str]] = [
    ("no client certificate", NO_CERT, "temporal.tls.cert_file"),
    ("certificate from another CA", "stranger", "temporal.tls.cert_file"),
    ("wrong server name", {"server_name": "temporal.elsewhere"}, "temporal.tls.server_name"),
    ("frontend's CA not trusted", "other_ca", "temporal.tls.ca_file"),
]


def bad_tls(pki: Pki, change: dict[str, Any] | str) -> dict[str, Any]:
    if change == "stranger":
        return tls_section(pki, cert_file=str(pki.stranger.cert), key_file=str(pki.stranger.key))
    if change == "other_ca":
        return tls_section(pki, ca_file=str(pki.other_ca.path))
    assert isinstance(change, dict)
    return tls_section(pki, **change)


@activity.defn(name="tls_echo")
async def tls_echo(text: str) -> str:
    return f"echo {text}"


def agent_process(
    tmp: Path, agent_id: str, scheduler: str, tokens: Tokens, temporal: dict[str, Any], pool: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """``spillway agent run`` with its config (and relative certificate paths) in ``tmp``."""
    tokens.add(agent_id)
    config = write_yaml(
        tmp / f"{agent_id}.yaml",
        {
            "agent_id": agent_id,
            "scheduler": {"address": scheduler, "token_file": f"{agent_id}.token"},
            "labels": {"pool": pool, "provider": "onprem", "region": "eu-frankfurt"},
            "gpus": {
                "discovery": "static",
                "static": [{"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": 1}],
            },
            "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
            "state_dir": f"{agent_id}-state",
            "runtime": STAND_IN_RUNTIME,
            "temporal": temporal,
        },
    )
    tokens.write(agent_id, tmp)
    log = tmp / f"{agent_id}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "spillway", "agent", "run", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, log


def stop_process(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
async def scheduler(tokens: Tokens) -> AsyncIterator[Scheduler]:
    """A scheduler (no control plane) for agents to report to."""
    config = SchedulerConfig(
        listen="127.0.0.1:0", metrics_listen=None, tokens_file=tokens.path, report_interval_s=0.25
    )
    server = Scheduler(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0)


async def test_control_plane_and_node_worker_run_a_deployment_over_mutual_tls(
    tmp_path: Path, tokens: Tokens, pki: Pki, proxy: TlsProxy
) -> None:
    suffix = uuid.uuid4().hex[:6]
    name, pool = f"chat-{suffix}", f"reserved-{suffix}"
    weights = tmp_path / "model"
    weights.mkdir()
    policy_file = write_yaml(tmp_path / "policy.yaml", policy(name, pool, weights))
    temporal = {"address": proxy.address, "tls": tls_section(pki)}
    config = SchedulerConfig.model_validate(
        {
            "listen": "127.0.0.1:0",
            "metrics_listen": None,
            "tokens_file": tokens.path,
            "report_interval_s": 0.25,
            "policy_file": policy_file,
            "temporal": {**temporal, "task_queue": f"control-{suffix}", "identity": "sched-t"},
            "spill": {"weights_dir": str(tmp_path / "weights"), "sweep_every_s": 1},
        }
    )
    server = Scheduler(config)
    await server.start()
    # The agent's config names its certificates relative to itself.
    for src, dst in ((pki.ca.path, "ca.pem"), (pki.client.cert, "node.crt")):
        shutil.copy(src, tmp_path / dst)
    shutil.copy(pki.client.key, tmp_path / "node.key")
    agent_tls = {"ca_file": "ca.pem", "cert_file": "node.crt", "key_file": "node.key"}
    agent_tls["server_name"] = SERVER_NAME
    process, log = agent_process(
        tmp_path,
        f"tls-{suffix}",
        f"127.0.0.1:{server.port}",
        tokens,
        {"address": proxy.address, "tls": agent_tls},
        pool,
    )
    host = None
    try:
        host, _store = await start_control_plane(config, server.fleet, f"127.0.0.1:{server.port}")
        assert host.client.identity == "sched-t"
        # min_replicas 1 on the agent's free GPU: plan -> provision -> node worker starts it.

        def healthy() -> bool:
            return any(
                r.deployment == name and r.state is ReplicaState.HEALTHY
                for record, _ in server.fleet.agents()
                if record.report is not None
                for r in record.report.replicas
            )

        await eventually(healthy, within_s=30, interval=0.1)
        status = await host.status(name)
        assert any("reserved" in line for line in status.recent), status.recent
        assert "refused" not in log.read_text()
    finally:
        stop_process(process)
        if host is not None:
            for wid in (workflow_id(name), SWEEPER_ID):
                with contextlib.suppress(Exception):
                    await host.client.get_workflow_handle(wid).terminate("test over")
            await host.stop()
        await server.stop(grace=0)


@pytest.mark.parametrize(("case", "change", "setting"), BAD, ids=[b[0] for b in BAD])
async def test_a_refused_control_plane_connection_is_one_line_naming_the_setting(
    pki: Pki, proxy: TlsProxy, case: str, change: dict[str, Any] | str, setting: str
) -> None:
    link = TemporalSettings.model_validate({"address": proxy.address, "tls": bad_tls(pki, change)})
    with pytest.raises(TemporalRefused) as caught:
        await connect_temporal(link, what="the control plane")
    message = str(caught.value)
    assert caught.value.setting == setting, message
    assert "\n" not in message and message.startswith("temporal.tls"), message
    assert setting in message and proxy.address in message, message


@pytest.mark.parametrize(("case", "change", "setting"), BAD, ids=[b[0] for b in BAD])
async def test_a_node_worker_logs_a_refusal_once_and_keeps_out(
    pki: Pki,
    proxy: TlsProxy,
    caplog: pytest.LogCaptureFixture,
    case: str,
    change: dict[str, Any] | str,
    setting: str,
) -> None:
    link = TemporalLink.model_validate({"address": proxy.address, "tls": bad_tls(pki, change)})
    worker = NodeWorker(link, f"agent-{uuid.uuid4().hex[:6]}", [tls_echo], max_backoff_s=0.05)
    caplog.set_level(logging.INFO, logger="agent.worker")
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: worker.refused is not None, within_s=10)
        await asyncio.sleep(0.5)  # about ten more attempts, each refused again
        assert not worker.running.is_set() and not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, errors
    assert errors[0].startswith(worker.refused or "-") and setting in errors[0], errors


async def test_a_node_worker_picks_up_a_corrected_certificate(
    tmp_path: Path, pki: Pki, proxy: TlsProxy
) -> None:
    """The files are read again at each attempt: replacing a rejected certificate is enough."""
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    shutil.copy(pki.stranger.cert, cert)
    shutil.copy(pki.stranger.key, key)
    tls = tls_section(pki, cert_file=str(cert), key_file=str(key))
    link = TemporalLink.model_validate({"address": proxy.address, "tls": tls})
    worker = NodeWorker(link, f"agent-{uuid.uuid4().hex[:6]}", [tls_echo], max_backoff_s=0.1)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: worker.refused is not None, within_s=10)
        assert "UnknownCA" in (worker.refused or ""), worker.refused
        shutil.copy(pki.client.cert, cert)
        shutil.copy(pki.client.key, key)
        await asyncio.wait_for(worker.running.wait(), 10)
        assert worker.refused is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("tls", "starts"),
    [
        (NO_CERT, "spillway: error: temporal.tls: the frontend at "),
        ({"cert_file": "missing.crt"}, "spillway: error: temporal.tls.cert_file: "),
    ],
    ids=["refused", "missing file"],
)
def test_spillway_scheduler_run_exits_2_with_the_line(
    tmp_path: Path, tokens: Tokens, pki: Pki, proxy: TlsProxy, tls: dict[str, Any], starts: str
) -> None:
    weights = tmp_path / "model"
    weights.mkdir()
    config = write_yaml(
        tmp_path / "scheduler.yaml",
        {
            "listen": "127.0.0.1:0",
            "metrics_listen": None,
            "tokens_file": str(tokens.path),
            "policy_file": str(write_yaml(tmp_path / "p.yaml", policy("c", "p", weights))),
            "temporal": {"address": proxy.address, "tls": bad_tls(pki, tls)},
        },
    )
    done = subprocess.run(
        [sys.executable, "-m", "spillway", "scheduler", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "temporal" in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(starts) and "cert_file" in lines[0], lines


async def test_spillway_agent_keeps_reporting_when_temporal_refuses_it(
    tmp_path: Path, tokens: Tokens, pki: Pki, proxy: TlsProxy, scheduler: Scheduler
) -> None:
    agent_id = f"tls-{uuid.uuid4().hex[:6]}"
    temporal = {"address": proxy.address, "tls": bad_tls(pki, NO_CERT)}
    process, log = agent_process(
        tmp_path, agent_id, f"127.0.0.1:{scheduler.port}", tokens, temporal, "p"
    )
    try:
        await eventually(lambda: "temporal.tls" in log.read_text(), within_s=20, interval=0.1)
        await eventually(
            lambda: any(r.agent_id == agent_id for r, _ in scheduler.fleet.agents()), within_s=10
        )
        await asyncio.sleep(0.5)
        assert process.poll() is None, log.read_text()
    finally:
        stop_process(process)
    lines = [line for line in log.read_text().splitlines() if "temporal.tls" in line]
    assert len(lines) == 1, lines
    assert "client certificate" in lines[0] and "replicas keep serving" in lines[0], lines


def test_spillway_agent_refuses_to_start_on_a_missing_certificate(
    tmp_path: Path, tokens: Tokens, pki: Pki
) -> None:
    tls = tls_section(pki, cert_file="missing.crt")
    process, log = agent_process(
        tmp_path, "tls-missing", "127.0.0.1:1", tokens, {"address": "127.0.0.1:1", "tls": tls}, "p"
    )
    assert process.wait(60) == 2, log.read_text()
    text = log.read_text()
    assert f"spillway: error: temporal.tls.cert_file: {tmp_path / 'missing.crt'}: " in text, text
    assert "Traceback" not in text, text


@pytest.mark.parametrize("verify", [True, False], ids=["mutual TLS", "server TLS"])
async def test_nothing_behind_the_proxy_is_an_outage_not_a_refusal(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, verify: bool
) -> None:
    """The proxy completes the handshake and then closes the line (its backend is down): the
    node worker retries as for any outage, even without a client certificate to blame."""
    dead = TlsProxy(tmp_path, f"127.0.0.1:{_free_port()}", pki, verify=verify)
    try:
        tls = tls_section(pki) if verify else tls_section(pki, **NO_CERT)
        link = TemporalLink.model_validate({"address": dead.address, "tls": tls})
        with pytest.raises(RuntimeError) as caught:
            await connect_temporal(link, what="the control plane")
        assert not isinstance(caught.value, TemporalRefused), caught.value
        caplog.set_level(logging.INFO, logger="agent.worker")
        worker = NodeWorker(link, "agent-outage", [tls_echo], max_backoff_s=0.05)
        task = asyncio.create_task(worker.run())
        try:
            await eventually(
                lambda: sum("retrying" in r.getMessage() for r in caplog.records) >= 3,
                within_s=10,
            )
            assert worker.refused is None and worker.last_error is not None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        dead.stop()
