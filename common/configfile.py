"""Files a person provides: YAML config loaded into pydantic models, and secret files.

Used by every config file Spillway reads (agent, scheduler, and later the policy file). Every
problem is reported as ``FILE:LINE: FIELD: what was expected (got VALUE)``; values that came
from an environment override name the variable instead of the file. This module depends only on
pydantic and PyYAML so that the agent can use it without any scheduler code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)

# Nested keys in environment overrides are separated by a double underscore:
# SPILLWAY_AGENT_SCHEDULER__ADDRESS=host:port sets scheduler.address.
ENV_NESTING = "__"


class InputError(Exception):
    """Bad input from a person (a file, a field, a credential): the command exits with 2."""


class ConfigError(InputError):
    """A config file (or an override of it) is unreadable or invalid. ``str()`` is for people."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = problems
        super().__init__("; ".join(problems))


class CredentialError(InputError):
    """A token, certificate or key file is missing, unreadable or empty."""


def read_secret(path: Path, what: str) -> bytes:
    """Read a secret or certificate file; the error names the file, never its content."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise CredentialError(f"{path}: {what} file is empty")
    return data


def load_model(
    path: Path | str,
    model: type[ModelT],
    *,
    env_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelT:
    """Read ``path`` as YAML, apply environment overrides, and validate it as ``model``.

    Raises :class:`ConfigError` naming the file, the line, the field and what was expected.
    """
    path = Path(path)
    root, data = read_yaml_mapping(path)
    overrides: dict[tuple[str, ...], str] = {}
    if env_prefix:
        overrides = apply_env_overrides(
            data, env_prefix, os.environ if environ is None else environ
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [describe_error(path, root, err, overrides) for err in exc.errors()]
        raise ConfigError(path, problems) from exc


def read_yaml_mapping(path: Path) -> tuple[yaml.Node | None, dict[str, Any]]:
    """The document's node tree (for line numbers) and its data, which must be a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, [f"{where}: not valid YAML: {problem}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, [f"{path}:1: expected a mapping of fields, got {_kind(data)}"])
    return root, data


def apply_env_overrides(
    data: dict[str, Any], prefix: str, environ: Mapping[str, str]
) -> dict[tuple[str, ...], str]:
    """Set ``data[a][b] = value`` for every ``{prefix}A__B=value``; return path -> variable name."""
    applied: dict[tuple[str, ...], str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(prefix) or len(name) == len(prefix):
            continue
        keys = tuple(part.lower() for part in name[len(prefix) :].split(ENV_NESTING))
        target = data
        for key in keys[:-1]:
            child = target.get(key)
            if not isinstance(child, dict):
                child = {}
                target[key] = child
            target = child
        target[keys[-1]] = value
        applied[keys] = name
    return applied


def describe_error(
    path: Path,
    root: yaml.Node | None,
    err: Any,
    overrides: Mapping[tuple[str, ...], str] | None = None,
) -> str:
    """``FILE:LINE: field: expected ...`` for one pydantic error dict."""
    overrides = overrides or {}
    loc = tuple(str(part) for part in err["loc"])
    field = ".".join(loc) or "(top level)"
    message = _expected(err)
    for depth in range(len(loc), 0, -1):
        variable = overrides.get(loc[:depth])
        if variable is not None:
            return f"environment variable {variable}: {field}: {message}"
    line = line_of(root, loc)
    where = f"{path}:{line}" if line is not None else str(path)
    return f"{where}: {field}: {message}"


def _expected(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field (check the spelling; see the documented fields)"
    if kind == "missing":
        return "required field is missing"
    message = str(err["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    given = err.get("input")
    if kind == "value_error" and isinstance(given, dict | list):
        return message  # a check across fields; the message says what is wrong
    if isinstance(given, dict | list):
        return f"{message} (got a {_kind(given)})"
    return f"{message} (got {given!r})"


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def line_of(node: yaml.Node | None, loc: tuple[str, ...]) -> int | None:
    """1-based line of the deepest node along ``loc`` that exists in the document."""
    if node is None:
        return None
    line: int = node.start_mark.line + 1
    for key in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if str(key_node.value) == key:
                    line = key_node.start_mark.line + 1
                    child = value_node
                    break
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            child = node.value[int(key)]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def resolve_path(base: Path, value: Path | None) -> Path | None:
    """Resolve a path written in a config file relative to the file's own directory."""
    if value is None:
        return None
    value = value.expanduser()
    return value if value.is_absolute() else (base / value)
