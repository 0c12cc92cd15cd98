"""The control-plane module under real Terraform: what a control-plane machine boots with.

Several input sets go through one offline ``terraform apply``; the scheduler and gateway configs
it renders must load with the project's own loaders, the policy it writes with the policy
loader, the user data must be valid cloud-config holding no secret, every file a config names
under ``/run`` must be one that ``spillway-boot fetch`` writes there, and the two systemd units
must carry the hardening directives (and pass ``systemd-analyze verify`` where it exists). Bad
inputs stop ``terraform plan`` with a message that says what to set. The two-machine example
applies, and each of its gateways and agents lists both schedulers.
"""

from __future__ import annotations

import base64
import getpass
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from decisions.policycheck import load_policy
from gateway.config import load_gateway_config
from scheduler.config import load_scheduler_config
from tests.terraform.conftest import MODULES, TERRAFORM_DIR, Terraform, root_module

MODULE = MODULES / "control-plane"
BOOT_SCRIPT = MODULES / "agent-bootstrap" / "templates" / "spillway-boot.py"
EXAMPLE_CA = (TERRAFORM_DIR / "examples" / "control-plane" / "spillway-ca.pem").read_text()
TEMPORAL_CA = (TERRAFORM_DIR / "examples" / "control-plane" / "temporal-ca.pem").read_text()
POLICY = (TERRAFORM_DIR / "examples" / "control-plane" / "policy.yaml").read_text()
ARN = "arn:aws:secretsmanager:eu-central-1:123456789012:secret"

CASES: dict[str, dict[str, Any]] = {
    # A self-hosted Temporal behind mutual TLS, schedulers with TLS that require client
    # certificates, a tokens file read in place, and secrets from files on the machine.
    "self_hosted_mtls": {
        "name": "cp-eu-1",
        "policy": POLICY,
        "scheduler_addresses": ["cp-eu-1.internal:50051", "cp-eu-2.internal:50051"],
        "tokens_source": {"kind": "file", "ref": "/etc/spillway/tokens.yaml"},
        "scheduler_tls_cert_source": {"kind": "file", "ref": "/etc/spillway/pki/scheduler.pem"},
        "scheduler_tls_key_source": {"kind": "file", "ref": "/etc/spillway/pki/scheduler.key"},
        "scheduler_client_ca_pem": EXAMPLE_CA,
        "scheduler_ca_pem": EXAMPLE_CA,
        "scheduler_server_name": "scheduler.spillway.internal",
        "temporal_address": "temporal.internal:7233",
        "temporal_namespace": "spillway",
        "temporal_server_name": "frontend.temporal.internal",
        "temporal_ca_pem": TEMPORAL_CA,
        "temporal_client_cert_source": {"kind": "file", "ref": "/etc/spillway/pki/temporal.pem"},
        "temporal_client_key_source": {"kind": "file", "ref": "/etc/spillway/pki/temporal.key"},
        "gateway_token_source": {"kind": "file", "ref": "/etc/spillway/gateway.token"},
        "gateway_tls_cert_source": {"kind": "file", "ref": "/etc/spillway/pki/gateway.pem"},
        "gateway_tls_key_source": {"kind": "file", "ref": "/etc/spillway/pki/gateway.key"},
        "replica_api_key_source": {"kind": "file", "ref": "/etc/spillway/replica-api-key"},
        "report_interval_s": 2.5,
        "spill": {"launch_offers": 3},
        "clouds": {"aws": {"image": "ami-0123456789abcdef0", "regions": ["eu-central-1"]}},
        "package_index_url": "https://pypi.internal.example.com/simple",
        "package_version": "0.1.0",
    },
    # Temporal Cloud with an API key; every secret in AWS Secrets Manager; one scheduler.
    "temporal_cloud": {
        "name": "cp-us",
        "policy": "deployments: {}\n",
        "scheduler_addresses": ["10.0.0.5:50051"],
        "scheduler_listen": "10.0.0.5:50051",
        "scheduler_metrics_listen": "",
        "gateway_listen": "0.0.0.0:8080",
        "tokens_source": {"kind": "aws-secretsmanager", "ref": f"{ARN}:tokens"},
        "temporal_address": "eu-central-1.aws.api.temporal.io:7233",
        "temporal_namespace": "spillway.a1b2c",
        "temporal_api_key_source": {"kind": "aws-secretsmanager", "ref": f"{ARN}:temporal-key"},
        "gateway_token_source": {"kind": "aws-secretsmanager", "ref": f"{ARN}:gw-token"},
        "scheduler_environment_source": {"kind": "aws-secretsmanager", "ref": f"{ARN}:env"},
        "wheel_url": "https://artifacts.example.com/spillway-0.1.0-py3-none-any.whl",
        "system_packages": [],
    },
}


def tree_copy(tmp_path: Path) -> Path:
    """The terraform/ tree in a temporary directory: the module reads its sibling's boot
    script, so it is called by a relative path from inside the tree, as a git source keeps it."""
    return shutil.copytree(TERRAFORM_DIR, tmp_path / "terraform")


@pytest.fixture(scope="module")
def applied(terraform: Terraform, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The module's outputs for every case, from one real ``terraform apply``."""
    tree = tree_copy(tmp_path_factory.mktemp("control-plane-apply"))
    root = root_module(tree / "roots" / "cases", CASES, Path("../../modules/control-plane"))
    terraform.init(root)
    terraform.ok(root, "apply", "-auto-approve", "-input=false")
    outputs = json.loads(terraform.ok(root, "output", "-json").stdout)
    return {name: outputs[name]["value"] for name in CASES}


def files_of(user_data: str) -> dict[str, str]:
    """What cloud-init's write_files puts on the machine, by path."""
    document = yaml.safe_load(user_data)
    files: dict[str, str] = {}
    for entry in document["write_files"]:
        content = entry["content"]
        if entry.get("encoding") == "b64":
            content = base64.b64decode(content).decode()
        assert entry["path"] not in files, f"{entry['path']} written twice"
        files[entry["path"]] = content
    return files


def laid_out(applied: dict[str, Any], case: str, directory: Path) -> dict[str, Path]:
    """The case's config files and policy written to ``directory`` under their own names."""
    directory.mkdir(parents=True, exist_ok=True)
    files = files_of(applied[case]["user_data"])
    paths = {}
    for name in ("scheduler.yaml", "gateway.yaml", "policy.yaml", "bootstrap.json"):
        paths[name] = directory / name
        paths[name].write_text(files[f"/etc/spillway/{name}"])
    return paths


def test_module_validates(terraform: Terraform, tmp_path: Path) -> None:
    module = tree_copy(tmp_path) / "modules" / "control-plane"
    terraform.init(module)
    assert "Success" in terraform.ok(module, "validate").stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_data_is_cloud_config_for_both_services(applied: dict[str, Any], case: str) -> None:
    user_data = applied[case]["user_data"]
    assert user_data.startswith("#cloud-config\n")
    document = yaml.safe_load(user_data)
    assert set(document) <= {"users", "packages", "write_files", "runcmd"}
    users = {user["name"]: user for user in document["users"][1:]}
    assert set(users) == {"spillway-scheduler", "spillway-gateway"}
    for user in users.values():
        assert user["system"] is True and user["lock_passwd"] is True
        assert user["shell"] == "/usr/sbin/nologin"
    assert document.get("packages", []) == CASES[case].get("system_packages", ["python3-venv"])
    files = files_of(user_data)
    assert files["/usr/local/lib/spillway/spillway-boot"] == BOOT_SCRIPT.read_text()
    for unit in ("spillway-scheduler.service", "spillway-gateway.service"):
        assert files[f"/etc/systemd/system/{unit}"] == (MODULE / "templates" / unit).read_text()
    enable = ["systemctl", "enable", "--now", *applied[case]["service_names"]]
    assert enable in document["runcmd"]
    assert base64.b64decode(applied[case]["user_data_base64"]).decode() == user_data


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
def test_rendered_configs_load_with_the_projects_loaders(
    applied: dict[str, Any], case: str, tmp_path: Path
) -> None:
    inputs = CASES[case]
    paths = laid_out(applied, case, tmp_path)
    assert json.loads(paths["scheduler.yaml"].read_text()) == json.loads(
        applied[case]["scheduler_config"]
    )
    scheduler = load_scheduler_config(paths["scheduler.yaml"])
    gateway = load_gateway_config(paths["gateway.yaml"])
    policy = load_policy(paths["policy.yaml"])
    assert paths["policy.yaml"].read_text() == inputs["policy"]
    assert len(policy.deployments) == len(yaml.safe_load(inputs["policy"])["deployments"])

    assert scheduler.listen == inputs.get("scheduler_listen", "0.0.0.0:50051")
    assert scheduler.metrics_listen == (
        inputs.get("scheduler_metrics_listen", "0.0.0.0:9464") or None
    )
    assert scheduler.report_interval_s == inputs.get("report_interval_s", 5)
    assert scheduler.policy_file == gateway.policy_file == Path("/etc/spillway/policy.yaml")
    temporal = scheduler.temporal
    assert temporal is not None
    assert temporal.address == inputs["temporal_address"]
    assert temporal.namespace == inputs["temporal_namespace"]
    assert temporal.identity == inputs["name"]
    assert temporal.task_queue == "spillway-control"

    assert gateway.gateway_id == inputs["name"]
    assert gateway.listen == inputs.get("gateway_listen", "0.0.0.0:8000")
    assert gateway.scheduler.address is None
    assert gateway.scheduler.addresses == inputs["scheduler_addresses"]
    assert gateway.scheduler.token_file == Path("/run/spillway-gateway/token")


def test_mutual_tls_everywhere_points_at_fetched_files(
    applied: dict[str, Any], tmp_path: Path
) -> None:
    paths = laid_out(applied, "self_hosted_mtls", tmp_path)
    scheduler = load_scheduler_config(paths["scheduler.yaml"])
    gateway = load_gateway_config(paths["gateway.yaml"])
    run = Path("/run/spillway-scheduler")
    assert scheduler.tokens_file == Path("/etc/spillway/tokens.yaml")  # read in place
    assert scheduler.tls is not None
    assert (scheduler.tls.cert_file, scheduler.tls.key_file) == (run / "tls.pem", run / "tls.key")
    assert scheduler.tls.client_ca_file == run / "client-ca.pem"
    assert scheduler.temporal is not None and scheduler.temporal.tls is not None
    tls = scheduler.temporal.tls
    assert tls.ca_file == run / "temporal-ca.pem"
    assert (tls.cert_file, tls.key_file) == (
        run / "temporal-client.pem",
        run / "temporal-client.key",
    )
    assert tls.server_name == "frontend.temporal.internal"
    assert scheduler.temporal.api_key_file is None
    assert scheduler.clouds.aws is not None and scheduler.spill.launch_offers == 3
    assert gateway.scheduler.tls is not None
    assert gateway.scheduler.tls.ca_file == Path("/run/spillway-gateway/scheduler-ca.pem")
    assert gateway.scheduler.tls.key_file == Path("/run/spillway-gateway/tls.key")
    assert gateway.scheduler.tls.server_name == "scheduler.spillway.internal"
    assert gateway.replica_api_key_file == Path("/run/spillway-gateway/replica-api-key")


def test_temporal_cloud_uses_an_api_key_and_no_tls_section(
    applied: dict[str, Any], tmp_path: Path
) -> None:
    paths = laid_out(applied, "temporal_cloud", tmp_path)
    scheduler = load_scheduler_config(paths["scheduler.yaml"])
    assert scheduler.temporal is not None
    assert scheduler.temporal.tls is None  # an API key implies TLS with the system roots
    assert scheduler.temporal.api_key_file == Path("/run/spillway-scheduler/temporal-api-key")
    assert scheduler.tokens_file == Path("/run/spillway-scheduler/tokens.yaml")  # copied
    assert scheduler.tls is None and scheduler.metrics_listen is None
    settings = json.loads(paths["bootstrap.json"].read_text())
    assert settings["extras"] == "scheduler,gateway"
    (environment,) = [e for e in settings["files"]["scheduler"] if e["name"] == "environment"]
    assert environment["format"] == "env"
    assert environment["source"] == CASES["temporal_cloud"]["scheduler_environment_source"]
    assert settings["package"]["wheel_url"] == CASES["temporal_cloud"]["wheel_url"]


def run_paths(config: Any, prefix: str) -> set[str]:
    """Every string in a config that names a file under ``prefix``."""
    if isinstance(config, dict):
        return set().union(*(run_paths(value, prefix) for value in config.values()))
    if isinstance(config, list):
        return set().union(*(run_paths(value, prefix) for value in config))
    return {config} if isinstance(config, str) and config.startswith(prefix) else set()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fetch_writes_exactly_the_files_the_configs_name(
    applied: dict[str, Any], case: str, tmp_path: Path
) -> None:
    """Run spillway-boot fetch on the rendered settings, every reference redirected to a file
    holding a recognisable secret: each config's /run files are the ones written, and no
    secret is in the user data."""
    paths = laid_out(applied, case, tmp_path / "etc")
    settings = json.loads(paths["bootstrap.json"].read_text())
    secrets: dict[str, str] = {}
    for part in ("scheduler", "gateway"):
        for entry in settings["files"][part]:
            if "source" not in entry:
                continue
            value = f"secret-{part}-{entry['name']}-value"
            if entry["format"] == "pem":
                value = f"-----BEGIN PRIVATE KEY-----\n{value}\n-----END PRIVATE KEY-----"
            elif entry["format"] == "env":
                value = f"# cloud credentials\nAWS_SECRET_ACCESS_KEY={value}"
            holder = tmp_path / "secrets" / part / entry["name"]
            holder.parent.mkdir(parents=True, exist_ok=True)
            holder.write_text(value + "\n")
            entry["source"] = {"kind": "file", "ref": str(holder)}
            secrets[f"{part}/{entry['name']}"] = value
    paths["bootstrap.json"].write_text(json.dumps(settings))
    user_data = applied[case]["user_data"]
    for value in secrets.values():
        assert value not in user_data
    for part, config in (("scheduler", "scheduler.yaml"), ("gateway", "gateway.yaml")):
        run_dir = tmp_path / "run" / part
        done = subprocess.run(
            [
                *(sys.executable, str(BOOT_SCRIPT), "fetch", "--part", part),
                *("--settings", str(paths["bootstrap.json"]), "--run-dir", str(run_dir)),
                *("--user", getpass.getuser()),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        for value in secrets.values():
            assert value not in done.stdout + done.stderr
        written = {path.name for path in run_dir.iterdir()}
        prefix = f"/run/spillway-{part}/"
        named = {
            Path(path).name for path in run_paths(json.loads(paths[config].read_text()), prefix)
        }
        unit = directives((MODULE / "templates" / f"spillway-{part}.service").read_text())
        optional = {Path(path.lstrip("-")).name for path in unit.get("EnvironmentFile", [])}
        named |= optional & written
        assert written == named
        for name in written:
            key = f"{part}/{name}"
            if key in secrets:
                assert secrets[key] in (run_dir / name).read_text()
                assert (run_dir / name).stat().st_mode & 0o777 == 0o400


def test_fetch_fails_naming_a_missing_secret(applied: dict[str, Any], tmp_path: Path) -> None:
    paths = laid_out(applied, "self_hosted_mtls", tmp_path / "etc")
    done = subprocess.run(
        [
            *(sys.executable, str(BOOT_SCRIPT), "fetch", "--part", "gateway"),
            *("--settings", str(paths["bootstrap.json"]), "--run-dir", str(tmp_path / "run")),
            *("--user", getpass.getuser()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot read the gateway token file /etc/spillway/gateway.token" in done.stderr
    assert not (tmp_path / "run").exists()  # nothing written before every secret is in


# --- the systemd units -----------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "true",
    "ProtectSystem": "strict",
    "ProtectHome": "true",
    "PrivateTmp": "true",
    "PrivateDevices": "true",
    "PrivateMounts": "true",
    "PrivateUsers": "true",
    "DevicePolicy": "closed",
    "ProtectClock": "true",
    "ProtectKernelTunables": "true",
    "ProtectKernelModules": "true",
    "ProtectKernelLogs": "true",
    "ProtectControlGroups": "true",
    "ProtectHostname": "true",
    "ProtectProc": "invisible",
    "RestrictSUIDSGID": "true",
    "RestrictRealtime": "true",
    "RestrictNamespaces": "true",
    "LockPersonality": "true",
    "MemoryDenyWriteExecute": "true",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "SystemCallArchitectures": "native",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "Restart": "always",
    "StartLimitIntervalSec": "0",
    "UMask": "0077",
}


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize(
    ("service", "config"), [("scheduler", "scheduler"), ("gateway", "gateway")]
)
def test_units_are_hardened_and_run_unprivileged(service: str, config: str) -> None:
    unit = directives((MODULE / "templates" / f"spillway-{service}.service").read_text())
    for key, value in HARDENING.items():
        assert unit.get(key) == [value], f"{service}: {key}"
    assert unit["User"] == [f"spillway-{service}"] and unit["Group"] == [f"spillway-{service}"]
    assert unit["RuntimeDirectory"] == [f"spillway-{service}"]
    assert unit["ExecStart"] == [
        f"/opt/spillway/venv/bin/spillway {service} run --config /etc/spillway/{service}.yaml"
    ]
    boot = "+/usr/bin/python3 /usr/local/lib/spillway/spillway-boot"
    run = f"/run/spillway-{service}"
    assert unit["ExecStartPre"] == [
        f"{boot} install",
        f"{boot} fetch --part {service} --run-dir {run} --user spillway-{service}",
    ]
    if service == "scheduler":
        assert unit["EnvironmentFile"] == [f"-{run}/environment"]
    assert unit["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # Nothing is writable but the runtime directory; the configs are read-only.
    assert "StateDirectory" not in unit and "ReadWritePaths" not in unit
    assert unit["ReadOnlyPaths"] == ["/etc/spillway"]
    # No GPU or other device: no allow-list entry reopens /dev.
    assert "DeviceAllow" not in unit and "SupplementaryGroups" not in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("service", ["scheduler", "gateway"])
def test_systemd_analyze_verifies_the_units(service: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` (unknown keys, bad values) and the offline exposure score.

    verify checks that ExecStart's program exists, so the unit is checked with the venv's path
    pointing at a stand-in program in tmp_path; nothing else is changed.
    """
    program = tmp_path / "spillway"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    text = (MODULE / "templates" / f"spillway-{service}.service").read_text()
    unit = tmp_path / f"spillway-{service}.service"
    unit.write_text(text.replace("/opt/spillway/venv/bin/spillway", str(program)))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        # The threshold is on the 0-100 scale behind the 0.0-10.0 the report prints: 2.0 at most
        # (the agent's unit, which must see the GPUs, scores 3.7).
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Unknown" not in security.stderr, security.stderr
    assert security.returncode == 0, security.stdout[-2000:]


# --- bad inputs -----------------------------------------------------------------------------

BAD_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "policy_not_yaml": (
        {"policy": "deployments: [unclosed\n"},
        "The policy must be a YAML mapping",
    ),
    "policy_a_list": ({"policy": "- a\n- b\n"}, "The policy must be a YAML mapping"),
    "no_schedulers": ({"scheduler_addresses": []}, "Set scheduler_addresses to the host:port"),
    "duplicate_schedulers": (
        {"scheduler_addresses": ["a.internal:50051", "a.internal:50051"]},
        "Set scheduler_addresses to the host:port of every scheduler, each once",
    ),
    "tls_cert_without_key": (
        {"scheduler_tls_cert_source": {"kind": "file", "ref": "/etc/spillway/s.pem"}},
        "set scheduler_tls_cert_source and scheduler_tls_key_source together",
    ),
    "client_ca_without_tls": (
        {"scheduler_client_ca_pem": EXAMPLE_CA},
        "scheduler_client_ca_pem (mutual TLS) needs the scheduler's own TLS",
    ),
    "tls_without_ca_for_the_gateway": (
        {
            "scheduler_tls_cert_source": {"kind": "file", "ref": "/etc/spillway/s.pem"},
            "scheduler_tls_key_source": {"kind": "file", "ref": "/etc/spillway/s.key"},
        },
        "the scheduler uses TLS: set scheduler_ca_pem",
    ),
    "temporal_key_without_cert": (
        {"temporal_client_key_source": {"kind": "file", "ref": "/etc/spillway/t.key"}},
        "set temporal_client_cert_source and temporal_client_key_source together",
    ),
    "relative_api_key_file": (
        {"temporal_api_key_source": {"kind": "file", "ref": "api-key"}},
        "Set temporal_api_key_source.ref to where the scheduler's Temporal API key",
    ),
    "same_port_twice": ({"gateway_listen": "0.0.0.0:50051"}, "need a port each"),
    "unknown_cloud": ({"clouds": {"oracle": {"image": "x"}}}, "clouds may only have the keys"),
    "missing_tokens": ({"tokens_source": None}, 'The argument "tokens_source" is required'),
    "bad_temporal_address": ({"temporal_address": "temporal"}, "The temporal_address must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_plan_with_advice(terraform: Terraform, tmp_path: Path, case: str) -> None:
    changes, message = BAD_INPUTS[case]
    inputs = {k: v for k, v in {**CASES["temporal_cloud"], **changes}.items() if v is not None}
    tree = tree_copy(tmp_path)
    root = root_module(tree / "roots" / "bad", {"bad": inputs}, Path("../../modules/control-plane"))
    result = terraform.run(root, "init", "-input=false", "-backend=false")
    if result.returncode == 0:
        result = terraform.run(root, "plan", "-input=false")
    assert result.returncode != 0
    assert message in " ".join(result.output.split()), result.output


# --- the active-active example --------------------------------------------------------------


def test_active_active_example_lists_both_schedulers_everywhere(
    terraform: Terraform, tmp_path: Path
) -> None:
    example = tree_copy(tmp_path) / "examples" / "control-plane"
    terraform.init(example)
    assert "Success" in terraform.ok(example, "validate").stdout
    terraform.ok(example, "apply", "-auto-approve", "-input=false")
    machines = json.loads(
        terraform.ok(example, "output", "-json", "control_plane_user_data").stdout
    )
    assert sorted(machines) == ["cp-eu-1", "cp-eu-2"]
    schedulers = [f"{name}.spillway.internal:50051" for name in sorted(machines)]
    queues = set()
    for name, user_data in machines.items():
        paths = laid_out({name: {"user_data": user_data}}, name, tmp_path / name)
        gateway = load_gateway_config(paths["gateway.yaml"])
        scheduler = load_scheduler_config(paths["scheduler.yaml"])
        load_policy(paths["policy.yaml"])
        assert gateway.gateway_id == name
        assert gateway.scheduler.addresses == schedulers
        assert scheduler.temporal is not None and scheduler.temporal.identity == name
        queues.add((scheduler.temporal.address, scheduler.temporal.task_queue))
    assert len(queues) == 1  # one task queue: either scheduler may run any activity
    agent_data = json.loads(terraform.ok(example, "output", "-json", "agent_user_data").stdout)
    agent = json.loads(files_of(agent_data)["/etc/spillway/agent.yaml"])
    assert agent["scheduler"]["addresses"] == schedulers


# --- the README's Production section shows settings that load ---------------------------------


def readme_block(title: str) -> Any:
    text = (TERRAFORM_DIR.parent / "README.md").read_text()
    production = text[text.index("## Production\n") :]
    for block in production.split("```yaml\n")[1:]:
        body = block.split("```", 1)[0]
        if body.startswith(f"# {title}\n"):
            return yaml.safe_load(body)
    raise AssertionError(f"the README's Production section has no yaml block '# {title}'")


@pytest.mark.parametrize(
    "title",
    [
        "scheduler.yaml: temporal, a self-hosted cluster behind mutual TLS",
        "scheduler.yaml: temporal, Temporal Cloud with an API key",
    ],
)
def test_readme_temporal_examples_load(title: str) -> None:
    from scheduler.config import TemporalSettings

    settings = TemporalSettings.model_validate(readme_block(title)["temporal"])
    if "mutual" in title:
        assert settings.tls is not None and settings.tls.key_file is not None
    else:
        assert settings.tls is None and settings.api_key_file is not None


def test_readme_active_active_scheduler_section_loads() -> None:
    from common.schedulerlink import SchedulerEndpoint

    endpoint = SchedulerEndpoint.model_validate(
        readme_block("agent.yaml or gateway.yaml: two schedulers")["scheduler"]
    )
    assert endpoint.addresses is not None and len(endpoint.addresses) == 2


def test_fetch_refuses_an_environment_file_systemd_would_misread(
    applied: dict[str, Any], tmp_path: Path
) -> None:
    paths = laid_out(applied, "temporal_cloud", tmp_path / "etc")
    settings = json.loads(paths["bootstrap.json"].read_text())
    holder = tmp_path / "scheduler.env"
    holder.write_text("AWS_ACCESS_KEY_ID=AKIA0\nsecret-without-a-name\n")
    for entry in settings["files"]["scheduler"]:
        if "source" in entry:
            entry["source"] = {"kind": "file", "ref": str(holder)}
    paths["bootstrap.json"].write_text(json.dumps(settings))
    done = subprocess.run(
        [
            *(sys.executable, str(BOOT_SCRIPT), "fetch", "--part", "scheduler"),
            *("--settings", str(paths["bootstrap.json"]), "--run-dir", str(tmp_path / "run")),
            *("--user", getpass.getuser()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert f"the scheduler's environment file in file {holder}: line 2 is not NAME=value" in (
        done.stderr
    )
    assert "secret-without-a-name" not in done.stderr
