"""spillway-boot, the helper the user data installs: run as the machine would run it."""

from __future__ import annotations

import base64
import datetime
import getpass
import json
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
    settings = tmp_path / "missing-settings.json"  # never read when installed
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
