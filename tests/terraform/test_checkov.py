"""checkov over the whole terraform/ tree: no failed check, and every skip justified in place.

checkov pins boto3 and packaging to versions the project's own dependencies outgrew, so it
lives in a virtualenv of its own (``.venv-checkov``, made by ``make test``), or wherever
``SPILLWAY_CHECKOV`` points. Without it the test is skipped locally and fails in CI (``CI`` set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.terraform.conftest import REPO, TERRAFORM_DIR

SKIP_COMMENT = re.compile(r"checkov:skip=([A-Z0-9_]+)(?::(.*))?")


def checkov_binary() -> str | None:
    candidates = [
        os.environ.get("SPILLWAY_CHECKOV", ""),
        str(REPO / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov") or "",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    binary = checkov_binary()
    if binary is None:
        message = "checkov not found: run .ci/run, or set SPILLWAY_CHECKOV"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    home = tmp_path_factory.mktemp("checkov-home")
    env = {key: value for key, value in os.environ.items() if not key.startswith("BC_")}
    env.update({"HOME": str(home), "LOG_LEVEL": "WARNING"})
    done = subprocess.run(
        [
            binary,
            "--directory",
            str(TERRAFORM_DIR),
            "--framework",
            "terraform",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        timeout=300,
        check=False,
    )
    assert done.stdout.strip(), done.stderr
    parsed = json.loads(done.stdout)
    reports: list[dict[str, Any]] = parsed if isinstance(parsed, list) else [parsed]
    (terraform,) = [r for r in reports if r.get("check_type") == "terraform"]
    return terraform


def test_checkov_finds_no_failed_check(report: dict[str, Any]) -> None:
    summary = report["summary"]
    failed = [
        f"{check['check_id']} {check['resource']} ({check['file_path']})"
        for check in report["results"]["failed_checks"]
    ]
    assert summary["failed"] == 0, "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 50
    scanned = {Path(check["file_path"]).parts[2] for check in report["results"]["passed_checks"]}
    assert {"aws-agent", "gcp-agent", "azure-agent"} <= scanned


def test_every_skip_is_justified_in_place(report: dict[str, Any]) -> None:
    for check in report["results"]["skipped_checks"]:
        assert (check.get("check_result", {}).get("suppress_comment") or "").strip(), check
    for path in TERRAFORM_DIR.rglob("*.tf"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for match in SKIP_COMMENT.finditer(line):
                reason = (match.group(2) or "").strip()
                assert len(reason) > 15, f"{path}:{number}: skip of {match.group(1)} lacks a reason"
