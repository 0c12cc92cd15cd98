"""The agent's config file: valid files load, every mistake names its file, line and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_agent_config
from common.configfile import ConfigError
from tests.conftest import write_yaml

VALID: dict[str, Any] = {
    "agent_id": "gpu-node-1",
    "scheduler": {"address": "scheduler.internal:50051", "token_file": "agent.token"},
    "labels": {"pool": "reserved-eu", "provider": "aws", "region": "eu-west-1"},
    "gpus": {
        "discovery": "static",
        "static": [{"model": "NVIDIA L4", "memory_gib": 24, "count": 2}],
    },
}


def test_valid_file_loads_and_resolves_paths_next_to_it(tmp_path: Path) -> None:
    config = load_agent_config(write_yaml(tmp_path / "agent.yaml", VALID))
    assert config.agent_id == "gpu-node-1"
    assert config.scheduler.token_file == tmp_path / "agent.token"
    assert config.task_queue == "agent-gpu-node-1"
    assert config.reconnect.max_backoff_s == 30.0


def test_environment_overrides_nested_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPILLWAY_AGENT_SCHEDULER__ADDRESS", "10.0.0.5:6000")
    monkeypatch.setenv("SPILLWAY_AGENT_LABELS__ZONE", "eu-west-1b")
    monkeypatch.setenv("SPILLWAY_AGENT_RECONNECT__MAX_BACKOFF_S", "7.5")
    config = load_agent_config(write_yaml(tmp_path / "agent.yaml", VALID))
    assert config.scheduler.address == "10.0.0.5:6000"
    assert config.labels.zone == "eu-west-1b"
    assert config.reconnect.max_backoff_s == 7.5


def test_bad_environment_override_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPILLWAY_AGENT_SCHEDULER__ADDRESS", "no-port")
    with pytest.raises(ConfigError) as caught:
        load_agent_config(write_yaml(tmp_path / "agent.yaml", VALID))
    assert str(caught.value).startswith(
        "environment variable SPILLWAY_AGENT_SCHEDULER__ADDRESS: "
        "scheduler.address: expected host:port"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "agent_id: gpu-node-1\nscheduler:\n  address: x:1\n  token_file: t\n  tokne: oops\n"
            "labels: {pool: p, provider: aws, region: r}\n",
            ":5: scheduler.tokne: unknown field",
        ),
        (
            "agent_id: Bad_ID\nscheduler: {address: 'x:1', token_file: t}\n"
            "labels: {pool: p, provider: aws, region: r}\n",
            ":1: agent_id: String should match pattern",
        ),
        (
            "agent_id: a\nscheduler: {address: 'x:1', token_file: t}\n"
            "labels:\n  pool: p\n  provider: ibm\n  region: r\n",
            ":5: labels.provider: Input should be 'onprem', 'aws', 'gcp', 'azure' or 'local'"
            " (got 'ibm')",
        ),
        (
            "agent_id: a\nscheduler: {address: 'x:99999', token_file: t}\n"
            "labels: {pool: p, provider: aws, region: r}\n",
            ":2: scheduler.address: expected host:port",
        ),
        (
            "agent_id: a\nscheduler: {address: 'x:1', token_file: t}\n",
            ": labels: required field is missing",
        ),
        (
            "agent_id: a\nscheduler: {address: 'x:1', token_file: t}\n"
            "labels: {pool: p, provider: aws, region: r}\ngpus:\n  discovery: static\n",
            ":4: gpus: discovery 'static' needs a non-empty 'static' list",
        ),
        ("agent_id: [unclosed\n", ":2: not valid YAML"),
        ("- just\n- a list\n", ":1: expected a mapping of fields, got list"),
    ],
)
def test_errors_name_file_line_field_and_expectation(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent.yaml: cannot read: No such file"):
        load_agent_config(tmp_path / "agent.yaml")


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    bad = dict(VALID, labels={"pool": "p", "provider": "aws", "region": "r", "colour": "red"})
    path = write_yaml(tmp_path / "agent.yaml", bad)
    result = subprocess.run(
        [sys.executable, "-m", "spillway", "agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"spillway: error: {path}:9: labels.colour: unknown field "
        "(check the spelling; see the documented fields)"
    ]


def test_cli_missing_token_file_exits_2(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "agent.yaml", VALID)
    result = subprocess.run(
        [sys.executable, "-m", "spillway", "agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"spillway: error: {tmp_path / 'agent.token'}: "
        "cannot read bearer token: No such file or directory"
    ]
