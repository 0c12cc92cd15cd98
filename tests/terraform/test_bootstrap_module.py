"""The agent-bootstrap module under real Terraform, against the Python renderer.

Several input sets go through one ``terraform apply``; each module output must equal, byte for
byte, what ``providers.bootstrap`` renders from the same inputs, parse as cloud-config, and embed
an agent config that ``agent.config`` accepts. Bad inputs must stop ``terraform plan`` with a
message that says what to set.
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import AgentConfig, load_agent_config
from providers.bootstrap import (
    MAX_AWS_USER_DATA_BYTES,
    MAX_USER_DATA_BYTES,
    BootstrapSpec,
    StaticGpu,
    TokenSource,
    agent_config,
    gzip_user_data,
    jsonencode,
    render_user_data,
)
from providers.errors import InvalidRequestError, ResidencyError
from tests.terraform.conftest import BOOTSTRAP, TERRAFORM_DIR, Terraform, root_module

CA_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBszCCAVmgAwIBAgIUQ2FzZSBjZXJ0IGZvciB0ZXN0czAKBggqhkjOPQQDAjAS\n"
    "-----END CERTIFICATE-----\n"
)

CASES: dict[str, dict[str, Any]] = {
    "onprem_minimal": {
        "agent_id": "gpu-node-1",
        "cloud": "onprem",
        "pool": "reserved-eu",
        "region": "eu-frankfurt",
        "allowed_regions": ["eu-frankfurt"],
        "scheduler_address": "scheduler.internal:50051",
        "token_source": {"kind": "file", "ref": "/etc/spillway/agent.token"},
    },
    "aws_group": {
        "agent_id": "spillway-eu",
        "append_instance_id": True,
        "cloud": "aws",
        "pool": "reserved-eu",
        "region": "eu-central-1",
        "allowed_regions": ["eu-central-1", "eu-west-1"],
        "residency_group": "eu",
        "extra_labels": {"team": "inference", "cost-center": "42"},
        "scheduler_address": "10.0.0.5:50051",
        "temporal_address": "temporal.internal:7233",
        "token_source": {
            "kind": "aws-secretsmanager",
            "ref": "arn:aws:secretsmanager:eu-central-1:123456789012:secret:spillway-agent-AbCdEf",
        },
        "gpu_discovery": "nvml",
        "wheel_url": "https://artifacts.example.com/spillway-0.1.0-py3-none-any.whl",
        "system_packages": [],
    },
    "gcp_tls_static": {
        "agent_id": "gcp-west",
        "append_instance_id": True,
        "cloud": "gcp",
        "pool": "spill-gcp",
        "region": "europe-west4",
        "allowed_regions": ["europe-west4"],
        "zone": "europe-west4-a",
        "scheduler_address": "[fd00::5]:443",
        "scheduler_ca_pem": CA_PEM,
        "scheduler_server_name": "scheduler.spillway.internal",
        "temporal_address": "temporal.internal:7233",
        "temporal_namespace": "spillway",
        "token_source": {"kind": "gcp-secretmanager", "ref": "projects/p-1/secrets/agent-token"},
        "gpu_discovery": "static",
        "static_gpus": [
            {"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": 8},
            {"model": "NVIDIA L4", "memory_gib": 22.5, "count": 1},
        ],
        "reconnect_initial_backoff_s": 0.25,
        "reconnect_max_backoff_s": 12.5,
        "package_index_url": "https://pypi.internal.example.com/simple",
        "package_version": "0.1.0",
    },
    "azure_awkward_strings": {
        "agent_id": "az.node_1",
        "cloud": "azure",
        "pool": 'pool "q" <&> é ${x} %{y}',
        "region": "westeurope",
        "allowed_regions": ["northeurope", "westeurope"],
        "extra_labels": {"note": "back\\slash \u2028 tab\there 💥", "Zeta": "z", "alpha": ""},
        "scheduler_address": "scheduler.internal:50051",
        "token_source": {
            "kind": "azure-keyvault",
            "ref": "https://spillway-kv.vault.azure.net/secrets/agent-token",
        },
        "identity_client_id": "00000000-0000-0000-0000-000000000001",
        "reconnect_initial_backoff_s": 0.0001,
        "system_packages": ["python3-venv", "python3-pip"],
    },
    "temporal_mtls_sglang": {
        "agent_id": "gpu-mtls",
        "cloud": "onprem",
        "pool": "reserved-eu",
        "region": "eu-frankfurt",
        "allowed_regions": ["eu-frankfurt"],
        "scheduler_address": "",
        "scheduler_addresses": ["cp-eu-1.internal:50051", "cp-eu-2.internal:50051"],
        "token_source": {"kind": "file", "ref": "/etc/spillway/agent.token"},
        "temporal_address": "temporal.internal:7233",
        "temporal_namespace": "spillway-prod",
        "temporal_server_name": "frontend.temporal.internal",
        "temporal_ca_pem": CA_PEM,
        "temporal_client_cert_source": {"kind": "file", "ref": "/etc/spillway/temporal.pem"},
        "temporal_client_key_source": {
            "kind": "gcp-secretmanager",
            "ref": "projects/p-1/secrets/temporal-key",
        },
        "install_sglang": True,
    },
    "temporal_cloud_api_key": {
        "agent_id": "gpu-cloud",
        "cloud": "aws",
        "pool": "spill-aws",
        "region": "eu-central-1",
        "allowed_regions": ["eu-central-1"],
        "scheduler_address": "scheduler.internal:50051",
        "token_source": {
            "kind": "aws-secretsmanager",
            "ref": "arn:aws:secretsmanager:eu-central-1:123456789012:secret:agent-AbCdEf",
        },
        "temporal_address": "eu-central-1.aws.api.temporal.io:7233",
        "temporal_namespace": "spillway.a1b2c",
        "temporal_api_key_source": {
            "kind": "aws-secretsmanager",
            "ref": "arn:aws:secretsmanager:eu-central-1:123456789012:secret:temporal-api-key-Xy",
        },
    },
}

SOURCES = (
    "token_source",
    "temporal_client_cert_source",
    "temporal_client_key_source",
    "temporal_api_key_source",
)


def spec_from(inputs: dict[str, Any]) -> BootstrapSpec:
    """The Python spec for a set of module inputs (same names, tuples for lists)."""
    fields = dict(inputs)
    for name in SOURCES:
        if name in inputs:
            fields[name] = TokenSource(**inputs[name])
    fields["allowed_regions"] = tuple(inputs["allowed_regions"])
    fields["scheduler_addresses"] = tuple(inputs.get("scheduler_addresses", ()))
    fields.setdefault("scheduler_address", "")
    fields["static_gpus"] = tuple(StaticGpu(**gpu) for gpu in inputs.get("static_gpus", []))
    if "system_packages" in inputs:
        fields["system_packages"] = tuple(inputs["system_packages"])
    return BootstrapSpec(**fields)


@pytest.fixture(scope="module")
def applied(terraform: Terraform, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The module's outputs for every case, from one real ``terraform apply``."""
    root = root_module(tmp_path_factory.mktemp("bootstrap-apply"), CASES, BOOTSTRAP)
    terraform.init(root)
    terraform.ok(root, "apply", "-auto-approve", "-input=false")
    outputs = json.loads(terraform.ok(root, "output", "-json").stdout)
    return {name: outputs[name]["value"] for name in CASES}


def cloud_config(user_data: str) -> dict[str, Any]:
    assert user_data.startswith("#cloud-config\n")
    document: dict[str, Any] = yaml.safe_load(user_data)
    assert isinstance(document, dict)
    return document


def written(document: dict[str, Any], path: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [
        entry for entry in document["write_files"] if entry["path"] == path
    ]
    assert len(entries) == 1, f"{path} written {len(entries)} times"
    return entries[0]


def test_terraform_fmt_is_clean(terraform: Terraform, tmp_path: Path) -> None:
    args = ("fmt", "-check", "-recursive", "-diff")
    result = terraform.run(TERRAFORM_DIR, *args, data_dir=tmp_path)
    assert result.returncode == 0, f"run terraform fmt -recursive terraform/:\n{result.output}"


def test_module_validates(terraform: Terraform, tmp_path: Path) -> None:
    module = shutil.copytree(BOOTSTRAP, tmp_path / "agent-bootstrap")
    terraform.init(module)
    result = terraform.ok(module, "validate")
    assert "Success" in result.stdout


def test_onprem_example_applies(terraform: Terraform, tmp_path: Path) -> None:
    tree = shutil.copytree(TERRAFORM_DIR, tmp_path / "terraform")
    example = tree / "examples" / "onprem"
    terraform.init(example)
    terraform.ok(example, "apply", "-auto-approve", "-input=false")
    user_data = json.loads(terraform.ok(example, "output", "-json", "user_data").stdout)
    config = AgentConfig.model_validate_json(
        written(cloud_config(user_data), "/etc/spillway/agent.yaml")["content"]
    )
    assert config.gpus.discovery == "static" and config.gpus.static[0].count == 8


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_data_equals_python_rendering(applied: dict[str, Any], case: str) -> None:
    spec = spec_from(CASES[case])
    assert applied[case]["user_data"] == render_user_data(spec)
    assert applied[case]["agent_config"] == jsonencode(agent_config(spec))
    assert base64.b64decode(applied[case]["user_data_base64"]).decode() == render_user_data(spec)


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_data_is_cloud_config(applied: dict[str, Any], case: str) -> None:
    inputs = CASES[case]
    user_data = applied[case]["user_data"]
    document = cloud_config(user_data)
    assert set(document) <= {"users", "packages", "write_files", "runcmd"}
    assert document.get("packages", []) == inputs.get("system_packages", ["python3-venv"])
    assert document["users"][0] == "default"
    agent_user = document["users"][1]
    assert agent_user["name"] == "spillway" and agent_user["system"] is True
    assert agent_user["shell"] == "/usr/sbin/nologin" and agent_user["lock_passwd"] is True
    settings = json.loads(written(document, "/etc/spillway/bootstrap.json")["content"])
    for name in SOURCES:
        assert settings[name] == inputs.get(name), name
    assert settings["install_sglang"] is inputs.get("install_sglang", False)
    assert settings["temporal_ca_pem"] == inputs.get("temporal_ca_pem", "")
    assert settings["temporal_server_name"] == inputs.get("temporal_server_name", "")
    script = written(document, "/usr/local/lib/spillway/spillway-boot")
    assert script["encoding"] == "b64" and script["permissions"] == "0755"
    boot = (BOOTSTRAP / "templates" / "spillway-boot.py").read_bytes()
    assert base64.b64decode(script["content"]) == boot
    assert ["systemctl", "enable", "--now", "spillway-agent.service"] in document["runcmd"]
    assert len(user_data.encode()) <= MAX_USER_DATA_BYTES
    packed = gzip_user_data(user_data)
    assert len(packed) <= MAX_AWS_USER_DATA_BYTES
    assert gzip.decompress(packed).decode() == user_data


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="cloud-init is not installed")
@pytest.mark.parametrize("case", sorted(CASES))
def test_cloud_init_schema_accepts_user_data(
    applied: dict[str, Any], case: str, tmp_path: Path
) -> None:
    path = tmp_path / "user-data"
    path.write_text(applied[case]["user_data"])
    done = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_embedded_agent_config_is_valid(applied: dict[str, Any], case: str, tmp_path: Path) -> None:
    inputs = CASES[case]
    document = cloud_config(applied[case]["user_data"])
    text = written(document, "/etc/spillway/agent.yaml")["content"]
    config = AgentConfig.model_validate(json.loads(text))
    loaded = load_agent_config(_write(tmp_path / "agent.yaml", text))
    assert loaded == config
    assert config.agent_id == inputs["agent_id"]
    assert config.labels.provider == inputs["cloud"]
    assert config.labels.region == inputs["region"]
    assert config.labels.pool == inputs["pool"]
    assert config.labels.extra == inputs.get("extra_labels", {})
    if inputs.get("scheduler_addresses"):
        assert config.scheduler.address is None
        assert config.scheduler.addresses == inputs["scheduler_addresses"]
        # Left out, not null: an older agent would refuse a key it does not know.
        assert "address" not in json.loads(text)["scheduler"]
    else:
        assert config.scheduler.address == inputs["scheduler_address"]
        assert "addresses" not in json.loads(text)["scheduler"]
    assert str(config.scheduler.token_file) == "/run/spillway/token"
    assert (config.scheduler.tls is not None) == ("scheduler_ca_pem" in inputs)
    assert (config.temporal is not None) == ("temporal_address" in inputs)
    assert len(config.gpus.static) == len(inputs.get("static_gpus", []))


def test_systemd_unit_restarts_and_is_hardened(applied: dict[str, Any]) -> None:
    document = cloud_config(applied["onprem_minimal"]["user_data"])
    unit = written(document, "/etc/systemd/system/spillway-agent.service")["content"]
    directives: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            directives.setdefault(key, []).append(value)
    expected = {
        "Restart": "always",
        "User": "spillway",
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "CapabilityBoundingSet": "",
        "StartLimitIntervalSec": "0",
        # Replicas outlive an agent restart; the new agent adopts them.
        "KillMode": "process",
    }
    for key, value in expected.items():
        assert directives.get(key) == [value], key
    assert directives["ExecStart"] == [
        "/opt/spillway/venv/bin/spillway agent run --config /run/spillway/agent.yaml"
    ]
    # Only installing and fetching the token run with privileges; the agent itself never does.
    boot = "+/usr/bin/python3 /usr/local/lib/spillway/spillway-boot"
    assert directives["ExecStartPre"] == [f"{boot} install", f"{boot} prepare"]
    assert not directives["ExecStart"][0].startswith(("+", "!"))
    # Each of these turns on a device allow-list that would hide the GPUs from the agent.
    for key in ("PrivateDevices", "ProtectClock", "DeviceAllow", "DevicePolicy"):
        assert key not in directives, key


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "region_outside_allowed_list": (
        {"region": "us-east-1"},
        "region us-east-1 is not in allowed_regions [eu-frankfurt]: set region to one of them",
    ),
    "empty_allowed_regions": ({"allowed_regions": []}, "Set allowed_regions to the regions"),
    "missing_token_reference": ({"token_source": None}, 'The argument "token_source" is required'),
    "empty_token_reference": (
        {"token_source": {"kind": "aws-secretsmanager", "ref": " "}},
        "Set token_source.ref to where the agent token lives",
    ),
    "relative_token_file": (
        {"token_source": {"kind": "file", "ref": "agent.token"}},
        "set token_source.ref to an absolute path",
    ),
    "static_discovery_without_gpus": (
        {"gpu_discovery": "static"},
        "gpu_discovery is static: set static_gpus",
    ),
    "wheel_and_version": (
        {
            "wheel_url": "https://files.internal/spillway-0.1.0-py3-none-any.whl",
            "package_version": "0.1.0",
        },
        "set either wheel_url or package_version, not both",
    ),
    "bad_package_version": ({"package_version": "latest; rm -rf /"}, "The package_version must be"),
    "bad_scheduler_address": (
        {"scheduler_address": "scheduler.internal"},
        "The scheduler_address must be host:port",
    ),
    "both_scheduler_address_forms": (
        {"scheduler_addresses": ["cp-1.internal:50051"]},
        "set scheduler_address (one scheduler) or scheduler_addresses (several), exactly one",
    ),
    "no_scheduler_address": (
        {"scheduler_address": None},
        "set scheduler_address (one scheduler) or scheduler_addresses (several), exactly one",
    ),
    "duplicate_scheduler_addresses": (
        {
            "scheduler_address": None,
            "scheduler_addresses": ["cp-1.internal:50051", "cp-1.internal:50051"],
        },
        "The scheduler_addresses must each be host:port, each once",
    ),
    "temporal_cert_without_key": (
        {
            "temporal_address": "temporal.internal:7233",
            "temporal_client_cert_source": {"kind": "file", "ref": "/etc/spillway/t.pem"},
        },
        "set temporal_client_cert_source and temporal_client_key_source together",
    ),
    "temporal_settings_without_address": (
        {"temporal_server_name": "temporal.internal"},
        "the temporal_* connection settings need temporal_address",
    ),
    "relative_temporal_key_file": (
        {
            "temporal_address": "temporal.internal:7233",
            "temporal_api_key_source": {"kind": "file", "ref": "api-key"},
        },
        "Set temporal_api_key_source.ref to where the node worker's Temporal API key",
    ),
    "temporal_ca_not_pem": (
        {"temporal_address": "temporal.internal:7233", "temporal_ca_pem": "/etc/ca.pem"},
        "The temporal_ca_pem must be empty or a PEM certificate",
    ),
}


def bad_inputs(case: str) -> dict[str, Any]:
    changes, _ = BAD_INPUTS[case]
    return {k: v for k, v in {**CASES["onprem_minimal"], **changes}.items() if v is not None}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_plan_with_advice(terraform: Terraform, tmp_path: Path, case: str) -> None:
    root = root_module(tmp_path / "root", {"bad": bad_inputs(case)}, BOOTSTRAP)
    result = terraform.run(root, "init", "-input=false", "-backend=false")
    if result.returncode == 0:
        result = terraform.run(root, "plan", "-input=false")
    assert result.returncode != 0
    assert BAD_INPUTS[case][1] in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_python_refuses_the_same_bad_input(case: str) -> None:
    inputs = bad_inputs(case)
    if "token_source" not in inputs:
        with pytest.raises(TypeError, match="token_source"):
            BootstrapSpec(**inputs)
        return
    residency = case in ("region_outside_allowed_list", "empty_allowed_regions")
    with pytest.raises(ResidencyError if residency else InvalidRequestError):
        render_user_data(spec_from(inputs))
