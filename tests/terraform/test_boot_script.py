"""spillway-boot, the helper the user data installs: run as the machine would run it."""

from __future__ import annotations

import base64
import datetime
import getpass
import json
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from agent.config import load_agent_config
from common.schedulerlink import read_token
from providers.bootstrap import BootstrapSpec, TokenSource, render_user_data
from tests.terraform.conftest import BOOTSTRAP

SCRIPT = BOOTSTRAP / "templates" / "spillway-boot.py"


def load_boot() -> ModuleType:
    """The script as a module, compiled in memory (no __pycache__ next to the template)."""
    module = ModuleType("spillway_boot")
    module.__file__ = str(SCRIPT)
    exec(compile(SCRIPT.read_text(), str(SCRIPT), "exec"), module.__dict__)
    return module


def files_of(user_data: str) -> dict[str, bytes]:
    """What cloud-init's write_files would put on the machine, by path."""
    files: dict[str, bytes] = {}
    for entry in yaml.safe_load(user_data)["write_files"]:
        content = entry["content"]
        files[entry["path"]] = (
            base64.b64decode(content) if entry.get("encoding") == "b64" else content.encode()
        )
    return files


def boot_machine(tmp_path: Path, **changes: Any) -> tuple[Path, dict[str, Path], str]:
    """Render user data whose token lives in a file, and lay its files out under tmp_path."""
    secret = "s3cr3t-token-value"
    token_path = tmp_path / "secret" / "agent.token"
    token_path.parent.mkdir()
    token_path.write_text(secret + "\n")
    fields: dict[str, Any] = {
        "agent_id": "gpu-node-1",
        "cloud": "onprem",
        "pool": "reserved-eu",
        "region": "eu-frankfurt",
        "allowed_regions": ("eu-frankfurt",),
        "scheduler_address": "scheduler.internal:50051",
        "token_source": TokenSource("file", str(token_path)),
        "scheduler_ca_pem": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    }
    fields.update(changes)
    user_data = render_user_data(BootstrapSpec(**fields))
    assert secret not in user_data
    files = files_of(user_data)
    paths = {
        "settings": tmp_path / "bootstrap.json",
        "config": tmp_path / "agent.yaml",
        "script": tmp_path / "spillway-boot",
        "run": tmp_path / "run",
    }
    paths["settings"].write_bytes(files["/etc/spillway/bootstrap.json"])
    paths["config"].write_bytes(files["/etc/spillway/agent.yaml"])
    paths["script"].write_bytes(files["/usr/local/lib/spillway/spillway-boot"])
    return token_path, paths, secret


def run_boot(paths: dict[str, Path], command: str = "prepare") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(paths["script"]),
            command,
            "--settings",
            str(paths["settings"]),
            "--config",
            str(paths["config"]),
            "--run-dir",
            str(paths["run"]),
            "--user",
            getpass.getuser(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_prepare_fetches_the_token_and_writes_a_valid_config(tmp_path: Path) -> None:
    _, paths, secret = boot_machine(tmp_path)
    done = run_boot(paths)
    assert done.returncode == 0, done.stderr
    token_file = paths["run"] / "token"
    assert read_token(token_file) == secret
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o400
    config = load_agent_config(paths["run"] / "agent.yaml")
    assert config.agent_id == "gpu-node-1"
    assert config.scheduler.token_file == token_file
    assert config.scheduler.tls is not None
    assert (paths["run"] / "scheduler-ca.pem").read_text().startswith("-----BEGIN")
    for path in (paths["run"] / "agent.yaml", paths["settings"], paths["config"]):
        assert secret not in path.read_text()
    assert secret not in done.stdout + done.stderr


def test_prepare_fails_clearly_when_the_token_file_is_missing(tmp_path: Path) -> None:
    token_path, paths, _ = boot_machine(tmp_path)
    token_path.unlink()
    done = run_boot(paths)
    assert done.returncode == 1
    assert f"cannot read the agent token file {token_path}" in done.stderr
    assert not (paths["run"] / "agent.yaml").exists()


def test_prepare_refuses_a_token_that_is_not_one_word(tmp_path: Path) -> None:
    token_path, paths, _ = boot_machine(tmp_path)
    token_path.write_text("two words\n")
    done = run_boot(paths)
    assert done.returncode == 1
    assert "empty or not a single word" in done.stderr
    assert "two words" not in done.stderr


def test_machine_identity_completes_a_group_members_config(tmp_path: Path) -> None:
    boot = load_boot()
    _, paths, _ = boot_machine(tmp_path, cloud="aws", append_instance_id=True)
    settings = json.loads(paths["settings"].read_text())
    config = json.loads(paths["config"].read_text())
    identity = {"instance_id": "i-0123456789abcdef0", "zone": "eu-frankfurt-1a"}
    done = boot.complete_config(config, settings, identity, Path("/run/spillway/token"))
    assert done["agent_id"] == "gpu-node-1-i-0123456789abcdef0"
    assert done["labels"]["instance_id"] == "i-0123456789abcdef0"
    assert done["labels"]["zone"] == "eu-frankfurt-1a"
    assert config["agent_id"] == "gpu-node-1"  # the input is left alone
    path = tmp_path / "completed.yaml"
    path.write_text(json.dumps(done))
    assert load_agent_config(path).agent_id == done["agent_id"]


@pytest.mark.parametrize(
    ("base", "instance", "expected"),
    [
        ("gpu", "i-0abc", "gpu-i-0abc"),
        ("gpu", "Spillway_VMSS_3", "gpu-spillway_vmss_3"),
        ("gpu", "a b/c", "gpu-a-b-c"),
        ("g" * 60, "instance-name", "g" * 60 + "-in"),
    ],
)
def test_agent_id_for(base: str, instance: str, expected: str) -> None:
    assert load_boot().agent_id_for(base, instance) == expected


def test_sigv4_matches_botocore() -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    boot = load_boot()
    host = "secretsmanager.eu-central-1.amazonaws.com"
    body = json.dumps({"SecretId": "arn:aws:secretsmanager:eu-central-1:1:secret:x"}).encode()
    request = AWSRequest(
        method="POST",
        url=f"https://{host}/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "secretsmanager.GetSecretValue",
        },
    )
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "tok")
    SigV4Auth(credentials, "secretsmanager", "eu-central-1").add_auth(request)
    when = datetime.datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    ours = boot.sigv4_headers(
        host=host,
        region="eu-central-1",
        service="secretsmanager",
        target="secretsmanager.GetSecretValue",
        body=body,
        access_key="AKIDEXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        session_token="tok",
        now=when,
    )
    assert ours["authorization"] == request.headers["Authorization"]


@pytest.mark.parametrize(
    ("package", "tail"),
    [
        ({"wheel_url": "", "index_url": "", "version": ""}, ["spillway[agent]"]),
        (
            {"wheel_url": "", "index_url": "https://pypi.internal/simple", "version": "0.1.0"},
            ["--index-url", "https://pypi.internal/simple", "spillway[agent]==0.1.0"],
        ),
        (
            {"wheel_url": "https://files.internal/spillway-0.1.0-py3-none-any.whl"},
            ["spillway[agent] @ https://files.internal/spillway-0.1.0-py3-none-any.whl"],
        ),
    ],
)
def test_pip_command(package: dict[str, str], tail: list[str]) -> None:
    command = load_boot().pip_command(package, Path("/opt/spillway/venv"))
    assert command[:4] == ["/opt/spillway/venv/bin/pip", "install", "--no-input", "--upgrade"]
    assert command[4:] == tail


def test_install_does_nothing_once_the_agent_is_installed(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "spillway").write_text("#!/bin/sh\n")
    settings = tmp_path / "bootstrap.json"
    settings.write_text(json.dumps({"install_sglang": False, "package": {}}))
    load_boot().install(settings, venv)
    assert sorted(p.name for p in (venv / "bin").iterdir()) == ["spillway"]


class FakeCloud:
    """Stands in for ``_http``: answers by URL and records each request's headers."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    def __call__(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> bytes:
        self.requests.append((method, url, dict(headers or {})))
        return self.answers[url]


def test_gcp_token_and_identity_from_metadata_and_secret_manager() -> None:
    boot = load_boot()
    meta = boot.GCP_METADATA
    secret = "projects/p-1/secrets/agent-token"
    fake = FakeCloud(
        {
            f"{meta}/instance/service-accounts/default/token": b'{"access_token": "ya29.x"}',
            f"https://secretmanager.googleapis.com/v1/{secret}/versions/latest:access": json.dumps(
                {"payload": {"data": base64.b64encode(b"gcp-token\n").decode()}}
            ).encode(),
            f"{meta}/instance/name": b"spillway-eu-x1z9",
            f"{meta}/instance/zone": b"projects/123/zones/europe-west4-a",
        }
    )
    boot.__dict__["_http"] = fake
    settings = {"token_source": {"kind": "gcp-secretmanager", "ref": secret}}
    assert boot.read_token(settings) == "gcp-token"
    assert boot.machine_identity("gcp") == {
        "instance_id": "spillway-eu-x1z9",
        "zone": "europe-west4-a",
    }
    metadata_calls = [h for _, url, h in fake.requests if url.startswith(meta)]
    assert all(h == {"Metadata-Flavor": "Google"} for h in metadata_calls)
    (secret_call,) = [h for _, url, h in fake.requests if "secretmanager" in url]
    assert secret_call == {"Authorization": "Bearer ya29.x"}


def test_azure_token_and_identity_from_imds_and_key_vault() -> None:
    boot = load_boot()
    imds = boot.AZURE_IMDS
    vault = "https://spillway-kv.vault.azure.net/secrets/agent-token"
    token_url = (
        f"{imds}/identity/oauth2/token?api-version=2018-02-01"
        "&resource=https%3A%2F%2Fvault.azure.net&client_id=cid-1"
    )
    fake = FakeCloud(
        {
            token_url: b'{"access_token": "eyJ.x"}',
            f"{vault}?api-version=7.4": b'{"value": "azure-token"}',
            f"{imds}/instance/compute?api-version=2021-02-01": json.dumps(
                {"name": "spillway-eu_3", "zone": "2", "location": "westeurope"}
            ).encode(),
        }
    )
    boot.__dict__["_http"] = fake
    settings = {
        "token_source": {"kind": "azure-keyvault", "ref": vault},
        "identity_client_id": "cid-1",
    }
    assert boot.read_token(settings) == "azure-token"
    assert boot.machine_identity("azure") == {
        "instance_id": "spillway-eu_3",
        "zone": "westeurope-2",
    }
    assert fake.requests[0][2] == {"Metadata": "true"}
    assert fake.requests[1][2] == {"Authorization": "Bearer eyJ.x"}


def test_aws_token_from_imds_credentials_and_secrets_manager() -> None:
    boot = load_boot()
    imds = boot.AWS_IMDS
    arn = "arn:aws:secretsmanager:eu-central-1:123456789012:secret:agent-token-AbCdEf"
    fake = FakeCloud(
        {
            f"{imds}/api/token": b"imds-session",
            f"{imds}/meta-data/iam/security-credentials/": b"spillway-eu-role\n",
            f"{imds}/meta-data/iam/security-credentials/spillway-eu-role": json.dumps(
                {"AccessKeyId": "ASIAX", "SecretAccessKey": "sk", "Token": "st"}
            ).encode(),
            "https://secretsmanager.eu-central-1.amazonaws.com/": b'{"SecretString": "aws-token"}',
        }
    )
    boot.__dict__["_http"] = fake
    settings = {"token_source": {"kind": "aws-secretsmanager", "ref": arn}}
    assert boot.read_token(settings) == "aws-token"
    method, _, headers = fake.requests[-1]
    assert method == "POST"
    assert headers["x-amz-target"] == "secretsmanager.GetSecretValue"
    assert headers["x-amz-security-token"] == "st"
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=ASIAX/")
    assert all(
        h.get("X-aws-ec2-metadata-token") == "imds-session"
        for _, url, h in fake.requests[1:-1]
        if "api/token" not in url
    )


@pytest.mark.parametrize(
    ("kind", "ref"),
    [
        ("aws-secretsmanager", "agent-token"),
        ("gcp-secretmanager", "agent-token"),
        ("azure-keyvault", "https://example.com/agent-token"),
    ],
)
def test_malformed_secret_references_are_refused_before_any_request(kind: str, ref: str) -> None:
    boot = load_boot()
    fake = FakeCloud({})
    boot.__dict__["_http"] = fake
    with pytest.raises(boot.BootError, match=r"token_source\.ref"):
        boot.read_token({"token_source": {"kind": kind, "ref": ref}})
    assert fake.requests == []


# --- the Temporal connection --------------------------------------------------------------------

TEMPORAL_CA = "-----BEGIN CERTIFICATE-----\nVGVtcG9yYWwgQ0E=\n-----END CERTIFICATE-----\n"
CLIENT_CERT = "-----BEGIN CERTIFICATE-----\nY2xpZW50LWNlcnQtYm9keQ==\n-----END CERTIFICATE-----"
CLIENT_KEY = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----"
API_KEY = "tmprl-api-key-0123456789"


def temporal_machine(tmp_path: Path, **changes: Any) -> tuple[dict[str, Path], str, list[str]]:
    """A machine whose node worker reaches Temporal with mTLS and an API key, all by file."""
    secrets = tmp_path / "temporal"
    secrets.mkdir()
    for name, value in (("client.pem", CLIENT_CERT), ("client.key", CLIENT_KEY)):
        (secrets / name).write_text(value + "\n")
    (secrets / "api-key").write_text(API_KEY + "\n")
    fields: dict[str, Any] = {
        "temporal_address": "temporal.internal:7233",
        "temporal_namespace": "spillway-prod",
        "temporal_server_name": "frontend.temporal.internal",
        "temporal_ca_pem": TEMPORAL_CA,
        "temporal_client_cert_source": TokenSource("file", str(secrets / "client.pem")),
        "temporal_client_key_source": TokenSource("file", str(secrets / "client.key")),
        "temporal_api_key_source": TokenSource("file", str(secrets / "api-key")),
    }
    fields.update(changes)
    _, paths, token = boot_machine(tmp_path, **fields)
    user_data = render_user_data(
        BootstrapSpec(
            **{
                "agent_id": "gpu-node-1",
                "cloud": "onprem",
                "pool": "reserved-eu",
                "region": "eu-frankfurt",
                "allowed_regions": ("eu-frankfurt",),
                "scheduler_address": "scheduler.internal:50051",
                "token_source": TokenSource("file", "/etc/spillway/agent.token"),
                **fields,
            }
        )
    )
    key_body = CLIENT_KEY.splitlines()[1]
    secret_values = [token, key_body, API_KEY]
    for value in secret_values:
        assert value not in user_data
        assert value not in base64.b64encode(user_data.encode()).decode()
    return paths, user_data, secret_values


def test_user_data_names_where_temporal_secrets_live_never_their_values(tmp_path: Path) -> None:
    paths, user_data, _ = temporal_machine(tmp_path)
    settings = json.loads(paths["settings"].read_text())
    assert settings["temporal_client_key_source"] == {
        "kind": "file",
        "ref": str(tmp_path / "temporal" / "client.key"),
    }
    assert settings["temporal_api_key_source"]["ref"].endswith("/api-key")
    # The CA is public and travels inline, like the scheduler's.
    assert settings["temporal_ca_pem"] == TEMPORAL_CA
    assert "PRIVATE KEY" not in user_data


def test_prepare_writes_temporal_files_and_section(tmp_path: Path) -> None:
    paths, _, secrets = temporal_machine(tmp_path)
    done = run_boot(paths)
    assert done.returncode == 0, done.stderr
    run = paths["run"]
    for name in ("temporal-client.pem", "temporal-client.key", "temporal-api-key"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o400, name
    assert (run / "temporal-client.key").read_text() == CLIENT_KEY + "\n"
    assert (run / "temporal-client.pem").read_text() == CLIENT_CERT + "\n"
    assert (run / "temporal-api-key").read_text() == API_KEY + "\n"
    assert (run / "temporal-ca.pem").read_text() == TEMPORAL_CA
    config = json.loads((run / "agent.yaml").read_text())
    assert config["temporal"] == {
        "address": "temporal.internal:7233",
        "namespace": "spillway-prod",
        "identity": "gpu-node-1",
        "tls": {
            "ca_file": str(run / "temporal-ca.pem"),
            "cert_file": str(run / "temporal-client.pem"),
            "key_file": str(run / "temporal-client.key"),
            "server_name": "frontend.temporal.internal",
        },
        "api_key_file": str(run / "temporal-api-key"),
    }
    for value in secrets:
        assert value not in done.stdout + done.stderr
        assert value not in (run / "agent.yaml").read_text()


def test_api_key_alone_adds_no_tls_section_and_system_roots_on_request(tmp_path: Path) -> None:
    paths, _, _ = temporal_machine(
        tmp_path,
        temporal_server_name="",
        temporal_ca_pem="",
        temporal_client_cert_source=None,
        temporal_client_key_source=None,
    )
    assert run_boot(paths).returncode == 0
    section = json.loads((paths["run"] / "agent.yaml").read_text())["temporal"]
    assert "tls" not in section  # an API key implies TLS with the system roots
    assert section["api_key_file"] == str(paths["run"] / "temporal-api-key")
    assert not (paths["run"] / "temporal-client.key").exists()
    settings = json.loads(paths["settings"].read_text())
    settings["temporal_tls"] = True
    paths["settings"].write_text(json.dumps(settings))
    assert run_boot(paths).returncode == 0
    assert json.loads((paths["run"] / "agent.yaml").read_text())["temporal"]["tls"] == {}


def test_a_temporal_key_that_is_not_pem_fails_naming_it(tmp_path: Path) -> None:
    paths, _, _ = temporal_machine(tmp_path)
    (tmp_path / "temporal" / "client.key").write_text("not-a-key-but-secret\n")
    done = run_boot(paths)
    assert done.returncode == 1
    assert "the Temporal client key in file" in done.stderr and "is not PEM" in done.stderr
    assert "not-a-key-but-secret" not in done.stderr
    assert not (paths["run"] / "agent.yaml").exists()
    assert not (paths["run"] / "token").exists()  # nothing written before every secret is in


def test_a_missing_temporal_api_key_file_fails_naming_it(tmp_path: Path) -> None:
    paths, _, _ = temporal_machine(tmp_path)
    (tmp_path / "temporal" / "api-key").unlink()
    done = run_boot(paths)
    assert done.returncode == 1
    assert "cannot read the Temporal API key file" in done.stderr


def test_temporal_secrets_come_from_a_cloud_store_like_the_token() -> None:
    boot = load_boot()
    meta = boot.GCP_METADATA
    secret = "projects/p-1/secrets/temporal-key"
    fake = FakeCloud(
        {
            f"{meta}/instance/service-accounts/default/token": b'{"access_token": "ya29.x"}',
            f"https://secretmanager.googleapis.com/v1/{secret}/versions/latest:access": json.dumps(
                {"payload": {"data": base64.b64encode(CLIENT_KEY.encode()).decode()}}
            ).encode(),
        }
    )
    boot.__dict__["_http"] = fake
    settings = {"temporal_client_key_source": {"kind": "gcp-secretmanager", "ref": secret}}
    assert boot.fetch_temporal_files(settings) == {"temporal-client.key": CLIENT_KEY + "\n"}
    with pytest.raises(boot.BootError, match=r"temporal_api_key_source\.ref"):
        boot.fetch_temporal_files(
            {"temporal_api_key_source": {"kind": "aws-secretsmanager", "ref": "api-key"}}
        )


def _temporal_fields() -> set[str]:
    from agent.config import TemporalEndpoint

    return set(TemporalEndpoint.model_fields)


@pytest.mark.skipif(
    not {"tls", "api_key_file", "identity"} <= _temporal_fields(),
    reason="agent.config's temporal section has no tls/api_key_file/identity fields yet",
)
def test_completed_temporal_section_loads_with_the_agent_config(tmp_path: Path) -> None:
    paths, _, _ = temporal_machine(tmp_path)
    assert run_boot(paths).returncode == 0
    config = load_agent_config(paths["run"] / "agent.yaml")
    assert config.temporal is not None
    dumped = config.temporal.model_dump(mode="json")
    assert dumped["identity"] == "gpu-node-1"
    assert dumped["tls"]["key_file"] == str(paths["run"] / "temporal-client.key")
    assert dumped["api_key_file"] == str(paths["run"] / "temporal-api-key")


# --- installing SGLang where the image lacks it -----------------------------------------------


def fake_venv(tmp_path: Path, *, spillway: bool, sglang: bool) -> tuple[Path, Path]:
    """A venv whose python answers the sglang probe as told and whose pip logs its arguments."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexit {0 if sglang else 1}\n")
    (venv / "bin" / "pip").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    if spillway:
        (venv / "bin" / "spillway").write_text("#!/bin/sh\n")
    for path in (venv / "bin").iterdir():
        path.chmod(0o755)
    return venv, log


def write_settings(tmp_path: Path, install_sglang: bool) -> Path:
    settings = tmp_path / "bootstrap.json"
    package = {"wheel_url": "", "index_url": "", "version": "0.1.0"}
    settings.write_text(json.dumps({"install_sglang": install_sglang, "package": package}))
    return settings


@pytest.mark.parametrize(
    ("spillway", "sglang", "switch", "expected"),
    [
        (True, False, False, None),  # installed, SGLang not wanted
        (True, True, True, None),  # the image ships SGLang: left alone
        (True, False, True, "spillway[agent,sglang]==0.1.0"),
        (False, True, True, "spillway[agent]==0.1.0"),
        (False, False, True, "spillway[agent,sglang]==0.1.0"),
        (False, False, False, "spillway[agent]==0.1.0"),
    ],
)
def test_install_sglang_only_where_the_venv_cannot_find_it(
    tmp_path: Path, spillway: bool, sglang: bool, switch: bool, expected: str | None
) -> None:
    venv, log = fake_venv(tmp_path, spillway=spillway, sglang=sglang)
    load_boot().install(write_settings(tmp_path, switch), venv)
    if expected is None:
        assert not log.exists()
    else:
        assert log.read_text().split() == ["install", "--no-input", "--upgrade", expected]


def test_sglang_extra_is_pinned_in_pyproject() -> None:
    import tomllib

    pyproject = tomllib.loads((BOOTSTRAP.parents[2] / "pyproject.toml").read_text())
    (pin,) = pyproject["project"]["optional-dependencies"]["sglang"]
    assert re.fullmatch(r"sglang(\[[a-z,]+\])?==\d+\.\d+\.\d+(\.post\d+)?", pin), pin


def test_install_takes_the_extras_the_settings_name(tmp_path: Path) -> None:
    """A control-plane machine installs the scheduler and the gateway from the same venv."""
    venv, log = fake_venv(tmp_path, spillway=False, sglang=False)
    settings = tmp_path / "bootstrap.json"
    package = {"wheel_url": "", "index_url": "https://pypi.internal/simple", "version": ""}
    settings.write_text(json.dumps({"extras": "scheduler,gateway", "package": package}))
    load_boot().install(settings, venv)
    assert log.read_text().split()[-3:] == [
        "--index-url",
        "https://pypi.internal/simple",
        "spillway[scheduler,gateway]",
    ]
    assert (tmp_path / ".spillway-install.lock").exists()  # units sharing the venv take turns
