"""TLS and mutual TLS between agents and the scheduler, with certificates made in the test."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import grpc
import pytest

from agent.gpus import StaticInventory
from agent.reporter import Reporter
from common.schedulerlink import ClientTls
from scheduler.server import Scheduler
from spillway.status import fetch_fleet
from tests.certs import CertificateAuthority, Issued
from tests.conftest import SchedulerFactory, Tokens, agent_config, eventually


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Issued | CertificateAuthority]:
    ca = CertificateAuthority(tmp_path, "fleet-ca")
    rogue = CertificateAuthority(tmp_path, "rogue-ca")
    return {
        "ca": ca,
        "server": ca.issue("scheduler", server=True),
        "client": ca.issue("node-a", server=False),
        "rogue_client": rogue.issue("node-a", server=False),
    }


async def _mtls_scheduler(
    start: SchedulerFactory, pki: dict[str, object], mutual: bool
) -> Scheduler:
    ca = pki["ca"]
    server = pki["server"]
    assert isinstance(ca, CertificateAuthority) and isinstance(server, Issued)
    tls = {"cert_file": server.cert, "key_file": server.key}
    if mutual:
        tls["client_ca_file"] = ca.path
    return await start(tls=tls)


async def _reports_ok(
    scheduler: Scheduler, tokens: Tokens, tmp_path: Path, tls: ClientTls | None
) -> Reporter:
    config = agent_config("node-a", f"localhost:{scheduler.port}", tokens.write("node-a", tmp_path))
    config.scheduler.tls = tls
    reporter = Reporter(
        config,
        StaticInventory.from_config(config.gpus, "node-a"),
        tokens.clear["node-a"],
        version="test",
        hostname="h",
        rng=random.Random(0),
    )
    task = asyncio.create_task(reporter.run())
    try:
        await eventually(
            lambda: (
                reporter.reports_acked >= 1
                and (record := scheduler.fleet.get("node-a")) is not None
                and record.reports_received >= 2
            ),
            within_s=5,
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return reporter


async def test_mutual_tls_accepts_a_client_signed_by_the_trusted_ca(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path, pki: dict[str, object]
) -> None:
    scheduler = await _mtls_scheduler(start_scheduler, pki, mutual=True)
    ca, client = pki["ca"], pki["client"]
    assert isinstance(ca, CertificateAuthority) and isinstance(client, Issued)
    await _reports_ok(
        scheduler,
        tokens,
        tmp_path,
        ClientTls(ca_file=ca.path, cert_file=client.cert, key_file=client.key),
    )
    record = scheduler.fleet.get("node-a")
    assert record is not None and record.reports_received >= 2


@pytest.mark.parametrize("client_cert", [None, "rogue_client"])
async def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    start_scheduler: SchedulerFactory,
    tokens: Tokens,
    pki: dict[str, object],
    client_cert: str | None,
) -> None:
    scheduler = await _mtls_scheduler(start_scheduler, pki, mutual=True)
    ca = pki["ca"]
    assert isinstance(ca, CertificateAuthority)
    tls = ClientTls(ca_file=ca.path)
    if client_cert is not None:
        issued = pki[client_cert]
        assert isinstance(issued, Issued)
        tls = ClientTls(ca_file=ca.path, cert_file=issued.cert, key_file=issued.key)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch_fleet(f"localhost:{scheduler.port}", tokens.clear["oncall"], tls, deadline_s=3)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert scheduler.fleet.agents() == []


async def test_server_tls_with_token_and_refusals(
    start_scheduler: SchedulerFactory, tokens: Tokens, tmp_path: Path, pki: dict[str, object]
) -> None:
    scheduler = await _mtls_scheduler(start_scheduler, pki, mutual=False)
    ca = pki["ca"]
    assert isinstance(ca, CertificateAuthority)
    await _reports_ok(scheduler, tokens, tmp_path, ClientTls(ca_file=ca.path))
    address = f"localhost:{scheduler.port}"
    # Over TLS the token is still required.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch_fleet(address, "spw_bogus", ClientTls(ca_file=ca.path), deadline_s=3)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A client that does not trust the scheduler's CA does not connect.
    other = CertificateAuthority(tmp_path, "other-ca")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch_fleet(
            address, tokens.clear["oncall"], ClientTls(ca_file=other.path), deadline_s=3
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Plaintext to a TLS port does not connect either.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch_fleet(address, tokens.clear["oncall"], None, deadline_s=3)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
