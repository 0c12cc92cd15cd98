"""The aws-agent, gcp-agent and azure-agent modules, which cannot be initialised offline.

Their structure is read with python-hcl2: every variable described and typed, provider and
Terraform version constraints that 1.0 satisfies, nothing admitted from the internet, identities
that can read the token secret and the weights and nothing else, and validations that name what
to set. Their variables and cross-variable checks need no provider, so those run under real
Terraform: bad inputs must stop ``terraform plan`` with the advice.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import hcl2
import pytest

from tests.terraform.conftest import MODULES, TERRAFORM_DIR, Terraform

CLOUDS = ("aws", "gcp", "azure")
ALL_MODULES = ("agent-bootstrap", "control-plane", "aws-agent", "gcp-agent", "azure-agent")
PROVIDER_FREE = ("agent-bootstrap", "control-plane")
PROVIDER = {"aws": "aws", "gcp": "google", "azure": "azurerm"}


def clean(value: Any) -> Any:
    """python-hcl2's tree without its quoting: keys and string literals as Terraform reads them."""
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [clean(item) for item in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return json.loads(value)
    return value


def parse(module: str, name: str) -> dict[str, Any]:
    path = MODULES / module / name
    with path.open() as handle:
        parsed: dict[str, Any] = clean(hcl2.load(handle))
    return parsed


def variables(module: str) -> dict[str, dict[str, Any]]:
    return {
        name: body
        for block in parse(module, "variables.tf")["variable"]
        for name, body in block.items()
    }


def resources(module: str) -> dict[str, dict[str, Any]]:
    """``type.name`` -> body for every resource and data source of the module's main.tf."""
    tree = parse(module, "main.tf")
    found: dict[str, dict[str, Any]] = {}
    for kind, prefix in (("resource", ""), ("data", "data.")):
        for block in tree.get(kind, []):
            for rtype, named in block.items():
                for name, body in named.items():
                    found[f"{prefix}{rtype}.{name}"] = body
    return found


def of_type(found: dict[str, dict[str, Any]], rtype: str) -> list[dict[str, Any]]:
    return [body for key, body in found.items() if key.split(".")[-2] == rtype]


def text(module: str) -> str:
    return "\n".join(path.read_text() for path in sorted((MODULES / module).glob("*.tf")))


# --- conventions every module follows ---------------------------------------------------------


@pytest.mark.parametrize("module", ALL_MODULES)
def test_every_variable_is_described_and_typed(module: str) -> None:
    found = variables(module)
    assert found
    for name, body in found.items():
        assert len(body.get("description", "")) > 20, (
            f"{module}: variable {name} has no description"
        )
        assert "type" in body, f"{module}: variable {name} has no type"


@pytest.mark.parametrize("module", ALL_MODULES)
def test_every_output_is_described(module: str) -> None:
    outputs = [body for block in parse(module, "outputs.tf")["output"] for body in block.values()]
    assert outputs
    assert all(len(body.get("description", "")) > 10 for body in outputs)


def satisfies(version: tuple[int, ...], constraint: str) -> bool:
    """Whether ``version`` meets a Terraform version constraint such as ``>= 1.0, < 2.0``."""
    for part in constraint.split(","):
        match = re.fullmatch(r"\s*(>=|<=|>|<|=|!=|~>)?\s*([0-9.]+)\s*", part)
        assert match, f"cannot read version constraint {part!r}"
        op, wanted = match.group(1) or "=", tuple(int(x) for x in match.group(2).split("."))
        have = version[: len(wanted)] if op == "~>" else version
        padded = wanted + (0,) * (len(version) - len(wanted))
        checks = {
            ">=": version >= padded,
            "<=": version <= padded,
            ">": version > padded,
            "<": version < padded,
            "=": version == padded,
            "!=": version != padded,
            "~>": version >= padded and have[:-1] == wanted[:-1],
        }
        if not checks[op]:
            return False
    return True


@pytest.mark.parametrize("module", ALL_MODULES)
def test_versions_accept_terraform_1_0_and_pin_providers(module: str) -> None:
    terraform_block = parse(module, "versions.tf")["terraform"][0]
    assert satisfies((1, 0, 3), terraform_block["required_version"])
    assert not satisfies((0, 15, 5), terraform_block["required_version"])
    providers = terraform_block["required_providers"]
    providers = providers[0] if isinstance(providers, list) else providers
    if module in PROVIDER_FREE:
        assert providers in ({}, [], None)
        return
    cloud = module.removesuffix("-agent")
    spec = providers[PROVIDER[cloud]]
    assert spec["source"] == f"hashicorp/{PROVIDER[cloud]}"
    assert spec["version"]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_readme_and_example_show_the_module_block(cloud: str) -> None:
    readme = (MODULES / f"{cloud}-agent" / "README.md").read_text()
    assert 'source = "' in readme and f"{cloud}-agent" in readme
    example = (TERRAFORM_DIR / "examples" / cloud / "main.tf").read_text()
    assert f'source = "../../modules/{cloud}-agent"' in example
    required = {name for name, body in variables(f"{cloud}-agent").items() if "default" not in body}
    for name in required:
        assert re.search(rf"^\s*{name}\s*=", readme, re.M), f"README block lacks {name}"
        assert re.search(rf"^\s*{name}\s*=", example, re.M), f"example lacks {name}"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_cloud_modules_wrap_the_bootstrap(cloud: str) -> None:
    tree = parse(f"{cloud}-agent", "main.tf")
    calls = {name: body for block in tree["module"] for name, body in block.items()}
    assert calls["bootstrap"]["source"] == "../agent-bootstrap"
    assert calls["bootstrap"]["cloud"] == cloud
    assert calls["bootstrap"]["append_instance_id"] is True
    assert "module.bootstrap.user_data" in text(f"{cloud}-agent")
    # Passed through as they are: several schedulers, the Temporal connection, SGLang.
    for name in (
        "scheduler_address",
        "scheduler_addresses",
        "temporal_namespace",
        "temporal_server_name",
        "temporal_ca_pem",
        "temporal_tls",
        "install_sglang",
    ):
        assert calls["bootstrap"][name] == f"${{var.{name}}}", name
    # The Temporal secrets become references in the cloud's own store, or none.
    suffix = {"aws": "arn", "gcp": "id", "azure": "name"}[cloud]
    for secret, source in zip(
        TEMPORAL_SECRETS,
        ("temporal_client_cert_source", "temporal_client_key_source", "temporal_api_key_source"),
        strict=True,
    ):
        assert calls["bootstrap"][source].startswith(f'${{var.{secret}_{suffix} == "" ? null')


# --- nothing in from the internet -------------------------------------------------------------

INTERNET = {"0.0.0.0/0", "::/0", "*", "Internet", "internet", "Any"}


def test_aws_admits_nothing_from_the_internet() -> None:
    found = resources("aws-agent")
    assert not of_type(found, "aws_security_group_rule")
    (group,) = of_type(found, "aws_security_group")
    for dynamic in group.get("dynamic", []):
        for kind, body in dynamic.items():
            if kind == "ingress":
                assert (
                    body["for_each"]
                    == "${length(var.serving_cidr_blocks) > 0 ? [var.serving_cidr_blocks] : []}"
                )
    assert "ingress" not in group  # only the dynamic rule from the serving networks
    (template,) = of_type(found, "aws_launch_template")
    (nic,) = template["network_interfaces"]
    assert nic["associate_public_ip_address"] is False
    (metadata,) = template["metadata_options"]
    assert metadata["http_tokens"] == "required"


def test_gcp_admits_nothing_from_the_internet() -> None:
    found = resources("gcp-agent")
    for rule in of_type(found, "google_compute_firewall"):
        assert rule["direction"] == "INGRESS"
        assert rule["source_ranges"] == "${var.serving_cidr_blocks}"
    (template,) = of_type(found, "google_compute_instance_template")
    for nic in template["network_interface"]:
        assert "access_config" not in nic
    assert template["metadata"]["block-project-ssh-keys"] == "true"


def test_azure_admits_nothing_from_the_internet() -> None:
    found = resources("azure-agent")
    (group,) = of_type(found, "azurerm_network_security_group")
    fixed = group["security_rule"]
    assert any(
        rule["direction"] == "Inbound"
        and rule["access"] == "Deny"
        and rule["source_address_prefix"] == "Internet"
        for rule in fixed
    )
    for rule in fixed:
        if rule["access"] == "Allow" and rule["direction"] == "Inbound":
            assert rule.get("source_address_prefix") not in INTERNET
    for dynamic in group.get("dynamic", []):
        body = dynamic["security_rule"]["content"][0]
        assert body["source_address_prefixes"] == "${security_rule.value}"
        assert "var.serving_cidr_blocks" in dynamic["security_rule"]["for_each"]
    (scale_set,) = of_type(found, "azurerm_linux_virtual_machine_scale_set")
    for nic in scale_set["network_interface"]:
        for ip in nic["ip_configuration"]:
            assert "public_ip_address" not in ip
    assert scale_set["disable_password_authentication"] is True


@pytest.mark.parametrize("cloud", CLOUDS)
def test_serving_networks_can_never_be_the_internet(cloud: str) -> None:
    (validation,) = variables(f"{cloud}-agent")["serving_cidr_blocks"]["validation"]
    for network in ("0.0.0.0/0", "::/0"):
        assert f'!contains(var.serving_cidr_blocks, "{network}")' in validation["condition"]
    # The only place the internet appears at all is AWS's outbound HTTPS rule.
    mentions = [m.start() for m in re.finditer(r"0\.0\.0\.0/0", parse_free_text(cloud))]
    assert len(mentions) == (1 if cloud == "aws" else 0)


def parse_free_text(cloud: str) -> str:
    return (MODULES / f"{cloud}-agent" / "main.tf").read_text()


# --- identities: the agent's secrets and the weights, nothing else ----------------------------


TEMPORAL_SECRETS = (
    "temporal_client_cert_secret",
    "temporal_client_key_secret",
    "temporal_api_key_secret",
)


def secret_list(suffix: str) -> str:
    """``compact([...])`` of the three Temporal secret variables, as python-hcl2 writes it."""
    return "compact([" + ", ".join(f"var.{n}_{suffix}" for n in TEMPORAL_SECRETS) + "])"


def test_aws_role_reads_only_its_secrets_and_the_weights() -> None:
    found = resources("aws-agent")
    assert not of_type(found, "aws_iam_role_policy_attachment")
    assert not of_type(found, "aws_iam_policy")
    (policy,) = of_type(found, "aws_iam_role_policy")
    assert policy["policy"] == "${data.aws_iam_policy_document.agent.json}"
    document = found["data.aws_iam_policy_document.agent"]
    grants = {
        (tuple(statement["actions"]), _resources(statement["resources"]))
        for statement in document["statement"]
    }
    partition = "${data.aws_partition.current.partition}"
    secrets = "${concat([var.token_secret_arn], local.temporal_secret_arns)}"
    assert grants == {
        (("secretsmanager:GetSecretValue",), (secrets,)),
        (("s3:ListBucket",), (f"arn:{partition}:s3:::${{var.weights_bucket}}",)),
        (("s3:GetObject",), (f"arn:{partition}:s3:::${{var.weights_bucket}}/*",)),
    }
    (optional,) = document["dynamic"]
    kms = optional["statement"]["content"][0]
    assert kms["actions"] == ["kms:Decrypt"] and kms["resources"] == ["${statement.value}"]
    assert "var.token_secret_kms_key_arn" in optional["statement"]["for_each"]
    assert kms["condition"][0]["variable"] == "kms:ViaService"
    arns = parse("aws-agent", "main.tf")["locals"][0]["temporal_secret_arns"]
    assert arns == "${" + secret_list("arn") + "}"
    assume = found["data.aws_iam_policy_document.assume"]["statement"][0]
    assert assume["principals"][0]["identifiers"] == ["ec2.amazonaws.com"]


def _resources(value: Any) -> tuple[str, ...]:
    """A statement's resources: a list, or one expression (python-hcl2 gives a string)."""
    return (value,) if isinstance(value, str) else tuple(value)


def test_gcp_service_account_reads_only_its_secrets_and_the_weights() -> None:
    found = resources("gcp-agent")
    iam = {key: body for key, body in found.items() if "_iam_" in key}
    assert set(iam) == {
        "google_secret_manager_secret_iam_member.token",
        "google_secret_manager_secret_iam_member.temporal",
        "google_storage_bucket_iam_member.weights",
    }
    temporal = iam["google_secret_manager_secret_iam_member.temporal"]
    assert temporal["role"] == "roles/secretmanager.secretAccessor"
    assert temporal["secret_id"] == "${each.value}"
    assert temporal["for_each"] == "${toset(" + secret_list("id") + ")}"
    assert iam["google_secret_manager_secret_iam_member.token"]["role"] == (
        "roles/secretmanager.secretAccessor"
    )
    assert iam["google_secret_manager_secret_iam_member.token"]["secret_id"] == (
        "${var.token_secret_id}"
    )
    assert iam["google_storage_bucket_iam_member.weights"]["role"] == "roles/storage.objectViewer"
    assert iam["google_storage_bucket_iam_member.weights"]["bucket"] == "${var.weights_bucket}"
    (template,) = of_type(found, "google_compute_instance_template")
    (account,) = template["service_account"]
    assert account["email"] == "${google_service_account.agent.email}"


def test_azure_identity_reads_only_its_secrets_and_the_weights() -> None:
    found = resources("azure-agent")
    temporal = found.pop("azurerm_role_assignment.temporal")
    assert temporal["role_definition_name"] == "Key Vault Secrets User"
    assert temporal["scope"] == "${var.key_vault_id}/secrets/${each.value}"
    assert temporal["for_each"] == "${toset(" + secret_list("name") + ")}"
    assignments = of_type(found, "azurerm_role_assignment")
    scopes = {body["role_definition_name"]: body["scope"] for body in assignments}
    assert scopes == {
        "Key Vault Secrets User": "${var.key_vault_id}/secrets/${var.token_secret_name}",
        "Storage Blob Data Reader": (
            "${var.weights_storage_account_id}/blobServices/default/containers/"
            "${var.weights_container_name}"
        ),
    }
    (scale_set,) = of_type(found, "azurerm_linux_virtual_machine_scale_set")
    assert scale_set["identity"][0]["type"] == "UserAssigned"


# --- validations, read and run ----------------------------------------------------------------

REGION_VARIABLE = {"aws": "region", "gcp": "region", "azure": "location"}
SUBNET_VARIABLE = {"aws": "subnet_ids", "gcp": "subnetwork", "azure": "subnet_id"}
TOKEN_VARIABLE = {"aws": "token_secret_arn", "gcp": "token_secret_id", "azure": "token_secret_name"}


@pytest.mark.parametrize("cloud", CLOUDS)
def test_validations_name_what_to_set(cloud: str) -> None:
    found = variables(f"{cloud}-agent")
    region = REGION_VARIABLE[cloud]
    checks = parse(f"{cloud}-agent", "checks.tf")["locals"][0]["input_problems"]
    assert f"contains(var.allowed_regions, var.{region})" in checks
    for name in ("allowed_regions", SUBNET_VARIABLE[cloud], TOKEN_VARIABLE[cloud]):
        (validation, *_) = found[name]["validation"]
        assert f"var.{name}" in validation["condition"]
        assert validation["error_message"].startswith(f"Set {name} to")


VALID: dict[str, dict[str, Any]] = {
    "aws": {
        "name": "spillway-eu",
        "region": "eu-central-1",
        "allowed_regions": ["eu-central-1"],
        "vpc_id": "vpc-0123456789abcdef0",
        "subnet_ids": ["subnet-0123456789abcdef0"],
        "ami_id": "ami-0123456789abcdef0",
        "instance_type": "p5.48xlarge",
        "token_secret_arn": "arn:aws:secretsmanager:eu-central-1:123456789012:secret:token",
        "weights_bucket": "weights-eu",
        "scheduler_address": "scheduler.internal:50051",
        "control_plane_cidr_blocks": ["10.0.0.0/16"],
        "pool": "reserved-eu",
    },
    "gcp": {
        "name": "spillway-eu",
        "project_id": "example",
        "region": "europe-west4",
        "allowed_regions": ["europe-west4"],
        "network": "gpu",
        "subnetwork": "gpu-eu",
        "machine_type": "a3-highgpu-8g",
        "source_image": "family/common-cu123",
        "token_secret_id": "projects/example/secrets/token",
        "weights_bucket": "weights-eu",
        "scheduler_address": "scheduler.internal:50051",
        "pool": "reserved-eu",
    },
    "azure": {
        "name": "spillway-eu",
        "resource_group_name": "gpu",
        "location": "westeurope",
        "allowed_regions": ["westeurope"],
        "subnet_id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/"
        "virtualNetworks/v/subnets/gpu",
        "sku": "Standard_ND96isr_H100_v5",
        "admin_ssh_public_key": "ssh-ed25519 AAAA ops@example.com",
        "key_vault_id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.KeyVault/vaults/kv",
        "token_secret_name": "agent-token",
        "weights_storage_account_id": "/subscriptions/s/resourceGroups/g/providers/"
        "Microsoft.Storage/storageAccounts/weights",
        "weights_container_name": "models",
        "scheduler_address": "scheduler.internal:50051",
        "pool": "reserved-eu",
    },
}

BAD: dict[str, tuple[dict[str, Any], str]] = {
    "aws-region": ({"region": "us-east-1"}, "region us-east-1 is not in allowed_regions"),
    "aws-subnets": ({"subnet_ids": []}, "Set subnet_ids to at least one private subnet"),
    "aws-token": ({"token_secret_arn": ""}, "Set token_secret_arn to the ARN"),
    "aws-open-serving": ({"serving_cidr_blocks": ["0.0.0.0/0"]}, "must not contain 0.0.0.0/0"),
    "aws-temporal-key": (
        {"temporal_api_key_secret_arn": "temporal-key"},
        "The temporal_api_key_secret_arn must be empty or a Secrets Manager secret ARN",
    ),
    "gcp-temporal-key": (
        {"temporal_client_key_secret_id": "key"},
        "The temporal_client_key_secret_id must be empty or projects/P/secrets/S",
    ),
    "azure-temporal-cert": (
        {"temporal_client_cert_secret_name": "a/b"},
        "The temporal_client_cert_secret_name must be empty or a Key Vault secret name",
    ),
    "gcp-region": ({"region": "us-central1"}, "region us-central1 is not in allowed_regions"),
    "gcp-subnet": ({"subnetwork": ""}, "Set subnetwork to the self link"),
    "gcp-token": ({"token_secret_id": "agent-token"}, "Set token_secret_id to the secret"),
    "gcp-zones": ({"zones": ["us-east1-b"]}, "must all be in region europe-west4"),
    "azure-region": ({"location": "eastus"}, "location eastus is not in allowed_regions"),
    "azure-subnet": ({"subnet_id": ""}, "Set subnet_id to the resource id of a subnet"),
    "azure-token": ({"token_secret_name": ""}, "Set token_secret_name to the name"),
}


def inputs_only(module: str, directory: Path) -> Path:
    """The module's variables and cross-variable checks alone: no provider needed."""
    directory.mkdir()
    for name in ("variables.tf", "checks.tf"):
        shutil.copy(MODULES / module / name, directory / name)
    return directory


@pytest.mark.parametrize("cloud", CLOUDS)
def test_valid_inputs_plan(terraform: Terraform, tmp_path: Path, cloud: str) -> None:
    root = inputs_only(f"{cloud}-agent", tmp_path / cloud)
    (root / "terraform.tfvars.json").write_text(json.dumps(VALID[cloud]))
    terraform.init(root)
    terraform.ok(root, "plan", "-input=false")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_stops_plan_with_advice(terraform: Terraform, tmp_path: Path, case: str) -> None:
    cloud = case.split("-")[0]
    changes, message = BAD[case]
    root = inputs_only(f"{cloud}-agent", tmp_path / cloud)
    (root / "terraform.tfvars.json").write_text(json.dumps({**VALID[cloud], **changes}))
    terraform.init(root)
    result = terraform.run(root, "plan", "-input=false")
    assert result.returncode != 0
    assert message in " ".join(result.output.split()), result.output
