"""Tokens: stored hashed, bound to an id and a role, reloaded when the file changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from common.configfile import ConfigError
from scheduler.auth import Principal, TokenStore, add_token, hash_token


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_tokens_are_stored_hashed_and_bound_to_their_principal(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    agent = add_token(path, "gpu-node-1", "agent")
    operator = add_token(path, "oncall", "operator")
    text = path.read_text()
    assert agent not in text and operator not in text
    assert hash_token(agent) in text
    assert os.stat(path).st_mode & 0o777 == 0o600
    store = TokenStore(path)
    assert store.authenticate(_bearer(agent)) == Principal("gpu-node-1", "agent")
    assert store.authenticate(_bearer(operator)) == Principal("oncall", "operator")
    assert store.authenticate(_bearer(agent + "x")) is None
    assert store.authenticate([("authorization", f"Basic {agent}")]) is None
    assert store.authenticate([]) is None
    assert store.authenticate(None) is None


def test_new_token_for_the_same_principal_replaces_the_old(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    old = add_token(path, "gpu-node-1", "agent")
    new = add_token(path, "gpu-node-1", "agent")
    store = TokenStore(path)
    assert store.authenticate(_bearer(old)) is None
    assert store.authenticate(_bearer(new)) == Principal("gpu-node-1", "agent")


def test_reload_on_change_and_keep_old_tokens_on_a_broken_edit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.yaml"
    first = add_token(path, "a", "agent")
    store = TokenStore(path)
    second = add_token(path, "b", "agent")
    assert store.authenticate(_bearer(second)) == Principal("b", "agent")
    entries = yaml.safe_load(path.read_text())["tokens"]
    entries.append({"id": "c", "role": "admin", "sha256": "nothex"})
    path.write_text(yaml.safe_dump({"tokens": entries}))
    with caplog.at_level(logging.ERROR):
        assert store.authenticate(_bearer(first)) == Principal("a", "agent")
    assert "keeping the previous tokens" in caplog.text
    assert "tokens.2.role" in caplog.text
    assert first not in caplog.text and second not in caplog.text


def test_a_bad_tokens_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("tokens:\n  - id: a\n    role: agent\n    sha256: abc\n")
    with pytest.raises(ConfigError) as caught:
        TokenStore(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:4: tokens.0.sha256:")
    assert "should match pattern" in message


def test_gateway_tokens_from_the_command_line(tmp_path: Path) -> None:
    from spillway.cli import main

    path = tmp_path / "tokens.yaml"
    out = tmp_path / "gw-1.token"
    args = ["token", "new", "--id", "gw-1", "--role", "gateway", "--tokens-file", str(path)]
    assert main([*args, "--out", str(out)]) == 0
    token = out.read_text().strip()
    assert os.stat(out).st_mode & 0o777 == 0o600
    add_token(path, "gw-1", "agent")  # the same id in another role is another token
    store = TokenStore(path)
    assert store.authenticate(_bearer(token)) == Principal("gw-1", "gateway")
    entries = yaml.safe_load(path.read_text())["tokens"]
    assert [(e["id"], e["role"]) for e in entries] == [("gw-1", "gateway"), ("gw-1", "agent")]
