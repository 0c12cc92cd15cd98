"""The ``temporal:`` section: validation in both config files, the files it names, the API key
(sent as ``authorization: Bearer`` to a real gRPC server over TLS), and outages told apart from
refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from temporalio.service import TLSConfig

from agent.config import load_agent_config
from common.configfile import ConfigError, CredentialError
from common.temporallink import (
    MAX_PEM_BYTES,
    TemporalLink,
    TemporalRefused,
    connect_options,
    connect_temporal,
    describe_outage,
    read_api_key,
)
from scheduler.config import load_scheduler_config
from tests.certs import CertificateAuthority, Issued
from tests.conftest import write_yaml
from tests.temporal import _free_port

SECRET = "tmprl-7f3a9c0e1b2d4f6a8c0e2b4d6f8a0c2e"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path, "ca")


@pytest.fixture
def client_cert(ca: CertificateAuthority) -> Issued:
    return ca.issue("client", server=False)


def scheduler_yaml(tmp_path: Path, temporal: dict[str, Any]) -> Path:
    (tmp_path / "tokens.yaml").write_text("tokens: []\n")
    return write_yaml(
        tmp_path / "scheduler.yaml", {"tokens_file": "tokens.yaml", "temporal": temporal}
    )


def agent_yaml(tmp_path: Path, temporal: dict[str, Any]) -> Path:
    return write_yaml(
        tmp_path / "agent.yaml",
        {
            "agent_id": "node-a",
            "scheduler": {"address": "sched.internal:50051", "token_file": "node.token"},
            "labels": {"pool": "p", "provider": "onprem", "region": "eu"},
            "temporal": temporal,
        },
    )


FULL: dict[str, Any] = {
    "address": "temporal.internal:7233",
    "namespace": "prod",
    "identity": "sched-eu-1",
    "tls": {
        "ca_file": "temporal/ca.pem",
        "cert_file": "temporal/client.pem",
        "key_file": "/etc/spillway/temporal/client.key",
        "server_name": "temporal.internal",
    },
    "api_key_env": "TEMPORAL_API_KEY",
}


def test_the_scheduler_reads_the_section_with_paths_relative_to_its_file(tmp_path: Path) -> None:
    config = load_scheduler_config(scheduler_yaml(tmp_path, {**FULL, "task_queue": "spillway-eu"}))
    t = config.temporal
    assert t is not None and t.tls is not None
    assert (t.address, t.namespace, t.identity, t.task_queue) == (
        "temporal.internal:7233",
        "prod",
        "sched-eu-1",
        "spillway-eu",
    )
    assert t.tls.ca_file == tmp_path / "temporal" / "ca.pem"
    assert t.tls.cert_file == tmp_path / "temporal" / "client.pem"
    assert t.tls.key_file == Path("/etc/spillway/temporal/client.key")
    assert t.tls.server_name == "temporal.internal"
    assert t.api_key_env == "TEMPORAL_API_KEY" and t.api_key_setting == "temporal.api_key_env"


def test_the_agent_reads_the_same_section(tmp_path: Path) -> None:
    temporal = {"address": "temporal.internal:7233", "api_key_file": "keys/temporal"}
    config = load_agent_config(agent_yaml(tmp_path, temporal))
    assert config.temporal is not None
    assert config.temporal.api_key_file == tmp_path / "keys" / "temporal"
    assert config.temporal.namespace == "default" and config.temporal.tls is None
    with pytest.raises(ConfigError, match=r"temporal\.task_queue: unknown field"):
        load_agent_config(agent_yaml(tmp_path, {**temporal, "task_queue": "q"}))


PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"

#: (bad temporal section, what the one-line error must say)
REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"address": "t:7233", "api_key": SECRET}, "temporal: api_key: an API key is never written"),
    (
        {"address": "t:7233", "api_key_env": SECRET + "=="},
        "temporal: api_key_env: expected the NAME",
    ),
    (
        {"address": "t:7233", "tls": {"cert_file": "c.pem", "key_file": PEM_KEY + SECRET}},
        "temporal.tls: key_file holds PEM text",
    ),
    (
        {"address": "t:7233", "api_key_file": "k", "api_key_env": "K"},
        "temporal: give api_key_file or api_key_env, not both",
    ),
    (
        {"address": "t:7233", "tls": {"cert_file": "c.pem"}},
        "temporal.tls: cert_file and key_file must be given together",
    ),
    ({"address": "temporal.internal"}, "temporal.address: expected host:port"),
    ({"address": "t:7233", "tls": {"ca": "x"}}, "temporal.tls.ca: unknown field"),
    ({"address": "t:7233", "tls": {"server_name": "a b"}}, "temporal.tls.server_name:"),
]


@pytest.mark.parametrize(("temporal", "expected"), REFUSED)
@pytest.mark.parametrize("loader", ["scheduler", "agent"])
def test_bad_sections_are_one_line_naming_the_field_and_never_echo_a_secret(
    tmp_path: Path, temporal: dict[str, Any], expected: str, loader: str
) -> None:
    if loader == "scheduler":
        path = scheduler_yaml(tmp_path, temporal)
        with pytest.raises(ConfigError) as caught:
            load_scheduler_config(path)
    else:
        path = agent_yaml(tmp_path, temporal)
        with pytest.raises(ConfigError) as caught:
            load_agent_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and expected in message, message
    assert "\n" not in message and SECRET not in message and "MIGHAgEA" not in message


def link(**fields: Any) -> TemporalLink:
    return TemporalLink.model_validate({"address": "127.0.0.1:7233", **fields})


def test_connect_options_read_every_file(
    tmp_path: Path, ca: CertificateAuthority, client_cert: Issued
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(SECRET + "\n")
    tls = {
        "ca_file": str(ca.path),
        "cert_file": str(client_cert.cert),
        "key_file": str(client_cert.key),
        "server_name": "temporal.internal",
    }
    options = connect_options(link(tls=tls, api_key_file=str(key_file)), identity="node-a@h")
    assert options.tls == TLSConfig(
        server_root_ca_cert=ca.path.read_bytes(),
        client_cert=client_cert.cert.read_bytes(),
        client_private_key=client_cert.key.read_bytes(),
        domain="temporal.internal",
    )
    assert options.api_key == SECRET and options.identity == "node-a@h"
    assert SECRET not in repr(options) and "PRIVATE KEY" not in repr(options)
    kwargs = options.kwargs()
    assert kwargs["api_key"] == SECRET and kwargs["identity"] == "node-a@h"
    # The config's identity wins over the caller's default; no TLS and no key: plaintext.
    plain = connect_options(link(identity="sched-eu-1"), identity="node-a@h")
    assert (plain.tls, plain.api_key, plain.identity) == (False, None, "sched-eu-1")
    # An API key alone implies TLS with the system's roots.
    assert connect_options(link(api_key_file=str(key_file))).tls is True


def test_the_api_key_is_read_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPILLWAY_TEST_TEMPORAL_KEY", f"  {SECRET}\n")
    assert read_api_key(link(api_key_env="SPILLWAY_TEST_TEMPORAL_KEY")) == SECRET
    monkeypatch.delenv("SPILLWAY_TEST_TEMPORAL_KEY")
    with pytest.raises(CredentialError) as caught:
        read_api_key(link(api_key_env="SPILLWAY_TEST_TEMPORAL_KEY"))
    assert str(caught.value) == (
        "temporal.api_key_env: names SPILLWAY_TEST_TEMPORAL_KEY, which is not set (or empty) "
        "in this process's environment"
    )


def _bad_files(tmp_path: Path, good: Issued) -> dict[str, tuple[dict[str, Any], str]]:
    binary = tmp_path / "client.der"
    binary.write_bytes(b"\x30\x82\x01\x0a\x00\xff" * 20)
    empty = tmp_path / "empty.pem"
    empty.write_text("\n")
    huge = tmp_path / "huge.pem"
    with huge.open("wb") as handle:
        handle.truncate(MAX_PEM_BYTES + 1)
    two_lines = tmp_path / "two-lines"
    two_lines.write_text(f"{SECRET}\n{SECRET}\n")
    cert, key = str(good.cert), str(good.key)
    missing = str(tmp_path / "missing.pem")
    return {
        "missing": (
            {"cert_file": missing, "key_file": key},
            f"temporal.tls.cert_file: {missing}: ",
        ),
        "directory": (
            {"ca_file": str(tmp_path)},
            f"temporal.tls.ca_file: {tmp_path}: not a regular file",
        ),
        "empty": ({"ca_file": str(empty)}, f"temporal.tls.ca_file: {empty}: a CA certificate file"),
        "binary": (
            {"cert_file": str(binary), "key_file": key},
            f"temporal.tls.cert_file: {binary}: a binary file; expected a certificate in PEM form",
        ),
        "huge": ({"ca_file": str(huge)}, f"temporal.tls.ca_file: {huge}: larger than 1024 KiB"),
        "swapped": (
            {"cert_file": key, "key_file": cert},
            f"temporal.tls.cert_file: {key}: no PEM certificate in it; it holds a private key: "
            "are cert_file and key_file swapped?",
        ),
        "api key on two lines": (
            {"api_key_file": str(two_lines)},
            f"temporal.api_key_file: {two_lines}: API key must be a single line",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing", "directory", "empty", "binary", "huge", "swapped", "api key on two lines"]
)
def test_a_bad_file_is_one_line_naming_the_setting(
    tmp_path: Path, client_cert: Issued, case: str
) -> None:
    fields, expected = _bad_files(tmp_path, client_cert)[case]
    settings = link(**fields) if "api_key_file" in fields else link(tls=fields)
    with pytest.raises(CredentialError) as caught:
        connect_options(settings)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message and SECRET not in message


class FakeFrontend(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A gRPC service over TLS that records each call's metadata, then answers every call with
    an empty message (``accept``) or UNAUTHENTICATED, as Temporal Cloud does for a bad key."""

    def __init__(self) -> None:
        self.accept = True
        self.seen: list[dict[str, str | bytes]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        self.seen.append(dict(getattr(details, "invocation_metadata", ())))

        async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            if not self.accept:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Request unauthorized.")
            return b""

        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture
async def frontend(ca: CertificateAuthority) -> AsyncIterator[tuple[FakeFrontend, str]]:
    fake = FakeFrontend()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([fake])
    issued = ca.issue("frontend", server=True)
    credentials = grpc.ssl_server_credentials([(issued.key.read_bytes(), issued.cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.mark.parametrize("source", ["file", "env"])
async def test_the_api_key_goes_out_as_a_bearer_token(
    tmp_path: Path,
    ca: CertificateAuthority,
    frontend: tuple[FakeFrontend, str],
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    fake, address = frontend
    if source == "file":
        (tmp_path / "key").write_text(SECRET + "\n")
        where: dict[str, Any] = {"api_key_file": str(tmp_path / "key")}
    else:
        monkeypatch.setenv("SPILLWAY_TEST_TEMPORAL_KEY", SECRET)
        where = {"api_key_env": "SPILLWAY_TEST_TEMPORAL_KEY"}
    settings = TemporalLink.model_validate(
        {"address": address, "tls": {"ca_file": str(ca.path)}, **where}
    )
    client = await connect_temporal(settings, what="the control plane")
    assert client.api_key == SECRET
    assert fake.seen and all(m.get("authorization") == f"Bearer {SECRET}" for m in fake.seen)
    # A refused key: one line naming the setting the key came from, never the key.
    fake.accept = False
    with pytest.raises(TemporalRefused) as caught:
        await connect_temporal(settings, what="the control plane")
    setting = f"temporal.api_key_{source}"
    message = str(caught.value)
    assert caught.value.setting == setting and message.startswith(f"{setting}: the frontend at ")
    assert "refused the API key" in message and "Unauthenticated" in message, message
    assert SECRET not in message and "\n" not in message


async def test_tls_to_a_plaintext_frontend_is_a_refusal(temporal_address: str) -> None:
    settings = TemporalLink.model_validate({"address": temporal_address, "tls": {}})
    with pytest.raises(TemporalRefused) as caught:
        await connect_temporal(settings, what="the node worker")
    assert caught.value.setting == "temporal.tls"
    assert str(caught.value).startswith(
        f"temporal.tls: the frontend at {temporal_address} does not answer TLS"
    )


@pytest.mark.parametrize("tls", [None, {}])
async def test_nothing_listening_is_an_outage(tls: dict[str, Any] | None) -> None:
    settings = TemporalLink.model_validate({"address": f"127.0.0.1:{_free_port()}", "tls": tls})
    with pytest.raises(RuntimeError) as caught:
        await connect_temporal(settings, what="the node worker")
    assert not isinstance(caught.value, TemporalRefused)
    line = describe_outage(caught.value, settings)
    assert "Connection refused" in line and "\n" not in line, line


async def test_a_frontend_wanting_credentials_names_where_to_give_them(
    ca: CertificateAuthority, frontend: tuple[FakeFrontend, str]
) -> None:
    fake, address = frontend
    fake.accept = False
    settings = TemporalLink.model_validate({"address": address, "tls": {"ca_file": str(ca.path)}})
    with pytest.raises(TemporalRefused) as caught:
        await connect_temporal(settings, what="the node worker")
    assert str(caught.value) == (
        f"temporal: the frontend at {address} refused the node worker, which sent no "
        "credentials (Unauthenticated: Request unauthorized.); set temporal.api_key_file or "
        "api_key_env, or a client certificate in temporal.tls"
    )
    assert all("authorization" not in m for m in fake.seen)
