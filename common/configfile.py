"""Files a person provides: YAML config loaded into pydantic models, and secret files.

The one reader of every file a person writes (agent, scheduler and gateway configs, the policy,
the tokens file, simulation settings), with one set of bounds (size, nesting, values after
alias expansion) and one error shape: ``FILE:LINE: FIELD: what was expected (got VALUE)``;
values that came from an environment override name the variable instead of the file. This
module depends only on pydantic and PyYAML so that the agent can use it without any scheduler
code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, Strict, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Field types for files with no environment overrides (the policy): a value must already be of
#: the field's type, so ``true`` is not 1 and ``1e32`` is not a whole number. (Configs with
#: overrides take numbers as text from the environment and stay lax.)
Whole = Annotated[int, Strict()]
Real = Annotated[float, Strict()]
Flag = Annotated[bool, Strict()]

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


def read_secret_line(path: Path, what: str) -> str:
    """A one-line secret (a token, an API key) as text, without surrounding white space."""
    try:
        text = read_secret(path, what).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialError(f"{path}: {what} is not UTF-8 text") from None
    if any(ch.isspace() for ch in text):
        raise CredentialError(f"{path}: {what} must be a single line without spaces")
    return text


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


#: Bounds on a file a person writes: a config or policy is kilobytes; anything past these is a
#: mistake or an attack (a YAML alias bomb expands to billions of values from a few lines), and
#: is refused before it can stall the process that reads it.
MAX_FILE_BYTES = 1 << 20
MAX_VALUES = 100_000
MAX_DEPTH = 64


#: libyaml's parser when PyYAML was built with it (about ten times faster), else PyYAML's own.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml_mapping(path: Path) -> tuple[yaml.Node | None, dict[str, Any]]:
    """The document's node tree (for line numbers) and its data, which must be a mapping.

    Parses once, within :data:`MAX_FILE_BYTES`, :data:`MAX_VALUES` (counting every value an
    alias repeats) and :data:`MAX_DEPTH`; a key given twice in one mapping is an error naming
    both lines. Every failure is a :class:`ConfigError` with one line for people.
    """
    text = _read_text(path)
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(path, [f"{where}: not valid YAML: {problem}"]) from None
        except RecursionError:
            raise ConfigError(
                path, [f"{path}: nested deeper than {MAX_DEPTH} levels; refused"]
            ) from None
        if root is not None:
            _check_tree(path, root)
        try:
            data = loader.construct_document(root) if root is not None else None
        except (yaml.YAMLError, ValueError, LookupError, TypeError, OverflowError) as exc:
            # PyYAML's constructors raise more than YAMLError on odd scalars ("!!int " with
            # nothing after it is an IndexError inside PyYAML).
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(path, [f"{where}: not a valid YAML value: {problem}"]) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, [f"{path}:1: expected a mapping of fields, got {_kind(data)}"])
    return root, data


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, [f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            path, [f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB; refused as a config file"]
        )
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(path, [f"{path}: UTF-16 text; save the file as UTF-8"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            path, [f"{path}:{line}: not UTF-8 text (byte {exc.start}); is it a binary file?"]
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ConfigError(path, [f"{path}:{line}: a NUL character; is it a binary file?"])
    return text.removeprefix("\ufeff")


def _check_tree(path: Path, root: yaml.Node) -> None:
    """Depth, expanded size and duplicate keys, without recursion (the tree may be hostile)."""
    expanded: dict[int, int] = {}  # id(node) -> values under it, aliases expanded
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    on_path: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            line = node.start_mark.line + 1
            raise ConfigError(path, [f"{path}:{line}: nested deeper than {MAX_DEPTH} levels"])
        children = _children(node)
        if done:
            on_path.discard(id(node))
            expanded[id(node)] = 1 + sum(expanded[id(c)] for c in children)
            if expanded[id(node)] > MAX_VALUES:
                line = node.start_mark.line + 1
                raise ConfigError(
                    path,
                    [
                        f"{path}:{line}: holds more than {MAX_VALUES:,} values (counting "
                        "every repeat of a YAML alias); refused"
                    ],
                )
            continue
        if id(node) in expanded:
            continue  # an alias of a node already counted: its size is known
        if isinstance(node, yaml.MappingNode):
            _check_duplicate_keys(path, node)
        if any(id(c) in on_path or c is node for c in children):
            line = node.start_mark.line + 1
            raise ConfigError(path, [f"{path}:{line}: an alias refers to a value that holds it"])
        on_path.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_duplicate_keys(path: Path, node: yaml.MappingNode) -> None:
    seen: dict[str, int] = {}
    for key, _value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        name, line = str(key.value), key.start_mark.line + 1
        if name in seen:
            raise ConfigError(
                path, [f"{path}:{line}: {name!r} is given twice (first on line {seen[name]})"]
            )
        seen[name] = line


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
