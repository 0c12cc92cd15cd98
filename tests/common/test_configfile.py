"""The reader of every human-written file: bounded, one line per mistake, never a traceback.

The hostile inputs here are classes, each generated many ways: alias bombs of every fan-out,
nesting of every depth, duplicate keys anywhere, non-UTF-8 and binary bytes, and arbitrary
YAML-shaped text from hypothesis. Whatever comes in, the reader returns a mapping or raises
:class:`ConfigError` with one line naming the file, within a bounded time.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.configfile import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    ConfigError,
    CredentialError,
    read_secret_line,
    read_yaml_mapping,
)

#: The slowest a single hostile input may take to be refused (generous for a loaded CI box).
WORST_S = 2.0
#: Seconds each hostile input took to read or refuse; printed at the end of the module.
TRIED: list[float] = []


@pytest.fixture(scope="module", autouse=True)
def _report_tried() -> Iterator[None]:
    yield
    if TRIED:
        print(f"\nhostile inputs read: {len(TRIED)}, worst {max(TRIED) * 1e3:.0f} ms")


def refused(tmp_path: Path, content: bytes | str) -> str:
    path = tmp_path / "input.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    began = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        read_yaml_mapping(path)
    TRIED.append(time.monotonic() - began)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert TRIED[-1] < WORST_S, f"took {TRIED[-1]:.2f}s"
    return message


def bomb(fanout: int, levels: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * fanout)}]"]
    for level in range(1, levels):
        refs = ", ".join([f"*l{level - 1}"] * fanout)
        lines.append(f"l{level}: &l{level} [{refs}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("fanout", "levels"), [(9, 9), (2, 40), (50, 4), (1000, 2), (4, 12)])
def test_alias_bombs_are_refused_quickly(tmp_path: Path, fanout: int, levels: int) -> None:
    assert "holds more than" in refused(tmp_path, bomb(fanout, levels))


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {gpus: 1}\nx: *b\ny: *b\n")
    _, data = read_yaml_mapping(path)
    assert data == {"base": {"gpus": 1}, "x": {"gpus": 1}, "y": {"gpus": 1}}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 200, 1_000, 10_000])
@pytest.mark.parametrize("kind", ["flow-list", "flow-map", "block"])
def test_deep_nesting_is_one_line(tmp_path: Path, depth: int, kind: str) -> None:
    if kind == "flow-list":
        text = "a: " + "[" * depth + "]" * depth
    elif kind == "flow-map":
        text = "a: " + "{b: " * depth + "1" + "}" * depth
    else:
        text = "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "v\n"
    assert "nest" in refused(tmp_path, text)


@pytest.mark.parametrize("depth", [0, 1, 5])
def test_a_duplicate_key_names_both_lines(tmp_path: Path, depth: int) -> None:
    indent = "  " * depth
    head = "".join("  " * i + f"k{i}:\n" for i in range(depth))
    text = head + f"{indent}gpus: 8\n{indent}other: 1\n{indent}gpus: 1\n"
    message = refused(tmp_path, text)
    assert f":{depth + 3}: 'gpus' is given twice (first on line {depth + 1})" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("a: 1\n".encode("utf-16"), "UTF-16"),
        (b"a: 1\n\xff\xfe\x00garbage", ":2: not UTF-8"),
        (b"a: 1\nb: \x00\n", ":2: a NUL character"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "not UTF-8"),
        (b"a: " + b"x" * (MAX_FILE_BYTES + 1), "larger than"),
        (b"a: &x [*x]\n", "an alias refers to a value that holds it"),
        (b"- 1\n- 2\n", "expected a mapping"),
        (b"a: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_bytes_are_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    assert expected in refused(tmp_path, content)


FIXTURE = HealthCheck.function_scoped_fixture
YAMLISH = st.lists(
    st.sampled_from(
        [
            "a",
            "b:",
            " ",
            "  ",
            "\n",
            "- ",
            "[",
            "]",
            "{",
            "}",
            ",",
            "&x ",
            "*x",
            "&y ",
            "*y",
            "'",
            '"',
            "!!str ",
            "!!int ",
            "? ",
            ": ",
            "|",
            ">",
            "#",
            "1e400",
            ".inf",
            "~",
            "\t",
            "\u00e9",
            "\x00",
            "---\n",
            "...\n",
            "%YAML 1.1\n",
            "<<: ",
        ]
    ),
    max_size=60,
).map("".join)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=YAMLISH)
def test_any_yaml_shaped_text_gives_a_mapping_or_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    began = time.monotonic()
    try:
        _, data = read_yaml_mapping(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
    else:
        assert isinstance(data, dict)
    TRIED.append(time.monotonic() - began)
    assert TRIED[-1] < WORST_S


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=512))
def test_any_bytes_give_a_mapping_or_one_line(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "bytes.yaml"
    path.write_bytes(raw)
    try:
        _, data = read_yaml_mapping(path)
    except ConfigError as exc:
        assert "\n" not in str(exc), str(exc)
    else:
        assert isinstance(data, dict)


def test_every_command_reading_a_file_exits_2_with_one_line(tmp_path: Path) -> None:
    """The policy, agent config and tokens readers, from the command line, on a bomb."""
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(9, 9))
    commands = [
        ["policy", "check", str(path)],
        ["agent", "run", "--config", str(path)],
        ["scheduler", "run", "--config", str(path)],
    ]
    for args in commands:
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "spillway", *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (args, done.stderr)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and str(path) in lines[0], (args, lines)
        assert time.monotonic() - began < 20


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "file is empty"),
        (b"\xff\xfe\x00binary", "is not UTF-8 text"),
        (b"two words\n", "must be a single line without spaces"),
        (b"one\nline-too-many\n", "must be a single line without spaces"),
    ],
)
def test_a_one_line_secret_is_refused_in_one_line(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(CredentialError, match=expected):
        read_secret_line(path, "bearer token")
    path.write_bytes(b"  s3cret-Token_1 \n")
    assert read_secret_line(path, "bearer token") == "s3cret-Token_1"
