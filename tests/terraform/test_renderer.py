"""The Python side of the boot template: one file, the template subset, jsonencode's rules."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from providers import bootstrap
from providers.bootstrap import TemplateError, jsonencode, render_template
from tests.terraform.conftest import BOOTSTRAP, REPO


def test_package_reads_the_terraform_modules_own_files() -> None:
    link = REPO / "providers" / bootstrap.TEMPLATES_PACKAGE_DIR
    assert link.is_symlink()
    assert link.resolve() == (BOOTSTRAP / "templates").resolve()
    for name in (bootstrap.TEMPLATE, bootstrap.BOOT_SCRIPT):
        assert bootstrap.read_template_file(name) == (BOOTSTRAP / "templates" / name).read_bytes()


def test_built_wheel_carries_the_same_files(tmp_path: Path) -> None:
    """A wheel built from the tree holds the link's targets, so installs read the same bytes."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "providers",
        source / "providers",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(BOOTSTRAP / "templates", source / BOOTSTRAP.relative_to(REPO) / "templates")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet"]
    done = subprocess.run(
        [*pip, "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("spillway-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in (bootstrap.TEMPLATE, bootstrap.BOOT_SCRIPT):
            packed = archive.read(f"providers/{bootstrap.TEMPLATES_PACKAGE_DIR}/{name}")
            assert packed == (BOOTSTRAP / "templates" / name).read_bytes()


def test_template_uses_only_the_supported_subset() -> None:
    text = (BOOTSTRAP / "templates" / bootstrap.TEMPLATE).read_text()
    variables: dict[str, str | bool] = {
        "agent_config": "A",
        "bootstrap_settings": "B",
        "boot_script": "C",
        "system_packages": "D",
        "install_packages": True,
    }
    rendered = render_template(text, variables)
    assert "${" not in rendered.replace("$${", "").replace("${name}", "")
    for name in ("agent_config", "bootstrap_settings", "boot_script", "system_packages"):
        with pytest.raises(TemplateError, match=name):
            render_template(text, {k: v for k, v in variables.items() if k != name})


@pytest.mark.parametrize(
    ("template", "variables", "expected"),
    [
        ("a ${x} b", {"x": "1"}, "a 1 b"),
        ("a ${ x } b", {"x": "1"}, "a 1 b"),
        ("$${x} %%{ if y }", {}, "${x} %{ if y }"),
        ("a\n%{ if on }b\n%{ endif }c", {"on": True}, "a\nb\nc"),
        ("a\n%{ if on }b\n%{ endif }c", {"on": False}, "a\nc"),
        ("a\n%{ if on ~}\n  b\n%{ endif ~}\nc", {"on": True}, "a\nb\nc"),
        ("a\n%{ if on ~}\n  b\n%{ endif ~}\nc", {"on": False}, "a\nc"),
        ("%{ if a }1%{ if b }2%{ endif }3%{ endif }", {"a": True, "b": False}, "13"),
    ],
)
def test_supported_syntax(template: str, variables: dict[str, str | bool], expected: str) -> None:
    assert render_template(template, variables) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("${var.x}", "only variable names"),
        ("${upper(x)}", "only variable names"),
        ('${x == "a"}', "only variable names"),
        ("%{ for v in x }${v}%{ endfor }", "only %{ if name }"),
        ("%{ if flag }a%{ else }b%{ endif }", "only %{ if name }"),
        ("%{ if flag }a", "without %{ endif }"),
        ("a%{ endif }", "endif without if"),
        ("${~ x}", "strip marker"),
        ("${x", "unterminated"),
        ("${missing}", "unknown variable 'missing'"),
        ("%{ if flag }${flag}%{ endif }", "must be a string"),
        ("${flag}", "must be a string"),
        ("%{ if x }a%{ endif }", "needs a bool"),
    ],
)
def test_anything_else_is_refused(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)):
        render_template(template, {"x": "s", "flag": True})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (80, "80"),
        (80.0, "80"),
        (0.5, "0.5"),
        (1e-7, "0.0000001"),
        (True, "true"),
        (None, "null"),
        ("<a & b>", '"\\u003ca \\u0026 b\\u003e"'),
        ("\b\f\n\t\x01é", '"\\u0008\\u000c\\n\\t\\u0001é"'),
        ({"b": 1, "a": [1, "x"]}, '{"a":[1,"x"],"b":1}'),
    ],
)
def test_jsonencode_writes_what_terraform_writes(value: object, expected: str) -> None:
    assert jsonencode(value) == expected


def test_template_file_is_not_duplicated() -> None:
    found = [
        Path(directory) / bootstrap.TEMPLATE
        for top in ("providers", "terraform")
        for directory, _, files in os.walk(REPO / top)
        if bootstrap.TEMPLATE in files
    ]
    assert found == [BOOTSTRAP / "templates" / bootstrap.TEMPLATE]
