"""Tokens: stored hashed, bound to an id and a role, reloaded when the file changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.configfile import ConfigError
from scheduler.auth import Principal, TokenStore, add_token, hash_token
from tests.scheduler.test_streams import ListHandler


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


# -- broken edits keep the tokens in force ------------------------------------------------------


def _valid_file(path: Path) -> str:
    """A tokens file with agent ``a``; returns a's token."""
    path.unlink(missing_ok=True)
    return add_token(path, "a", "agent")


class Content(bytes):
    """Bytes whose repr stays short in hypothesis's reports."""

    def __repr__(self) -> str:
        return f"Content({bytes(self[:60])!r}..., {len(self)} bytes)"


@st.composite
def broken_contents(draw: st.DrawFn) -> Content:
    return Content(draw(_broken_bytes()))


@st.composite
def _broken_bytes(draw: st.DrawFn) -> bytes:
    """Bytes that are never a usable tokens file, by construction."""
    good = yaml.safe_dump(
        {"tokens": [{"id": "b", "role": "agent", "sha256": hash_token("spw_b")}]}
    ).encode()
    kind = draw(
        st.sampled_from(
            ["not-utf8", "nul", "utf16", "empty", "comments", "yaml", "entry", "shape", "huge"]
        )
    )
    if kind == "not-utf8":
        raw = draw(st.binary(min_size=1, max_size=300))
        assume(not _is_utf8(raw))
        return raw
    if kind == "nul":
        cut = draw(st.integers(0, len(good)))
        return good[:cut] + b"\x00" + good[cut:]
    if kind == "utf16":
        return good.decode().encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be"])))
    if kind == "empty":  # truncated to nothing, or to whitespace
        return draw(st.sampled_from([b"", b"\n", b"   \n\t\n", b"\xef\xbb\xbf"]))
    if kind == "comments":
        return b"# tokens were here\n" * draw(st.integers(1, 5))
    if kind == "yaml":  # a cut inside a flow collection: never valid YAML
        return b"tokens: [" + good[: draw(st.integers(0, len(good)))]
    if kind == "entry":
        field, value = draw(
            st.sampled_from([("role", "admin"), ("sha256", "nothex"), ("id", ""), ("extra", "x")])
        )
        entry = {"id": "b", "role": "agent", "sha256": hash_token("spw_b"), field: value}
        return yaml.safe_dump({"tokens": [entry]}).encode()
    if kind == "shape":
        return draw(
            st.sampled_from([b"tokens: 3\n", b"- a\n- b\n", b"just text\n", b"tokens:\n", b"[]"])
        )
    return b"tokens:\n" + b"  - x\n" * 200_000  # over the size bound


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _rewrite(path: Path, data: bytes) -> None:
    """Write ``data`` so that the file's stamp changes even when the content does not."""
    path.write_bytes(data)
    st_ = os.stat(path)
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000))


@settings(max_examples=120, deadline=None, database=None)
@given(contents=st.lists(broken_contents(), min_size=1, max_size=4))
def test_no_broken_edit_replaces_the_tokens_in_force_and_each_is_logged_once(
    tmp_path_factory: pytest.TempPathFactory, contents: list[Content]
) -> None:
    path = tmp_path_factory.mktemp("tokens") / "tokens.yaml"
    token = _valid_file(path)
    store = TokenStore(path)
    handler = ListHandler()
    records = handler.records
    logger = logging.getLogger("scheduler.auth")
    logger.addHandler(handler)
    try:
        for data in contents:
            for _tick in range(3):  # the same broken bytes, saved again and again
                _rewrite(path, data)
                assert store.reload() is False
                assert store.authenticate(_bearer(token)) == Principal("a", "agent")
                assert store.authenticate(_bearer("spw_b")) is None
                assert store.errors, data[:40]
                assert all("\n" not in e for e in store.errors)
    finally:
        logger.removeHandler(handler)
    refused = [r for r in records if "keeping the previous tokens" in r.getMessage()]
    # Once per run of the same bytes: the same broken content again is not news.
    runs = sum(1 for n, d in enumerate(contents) if n == 0 or d != contents[n - 1])
    assert len(refused) == runs, [r.getMessage()[:80] for r in refused]
    assert all(token not in r.getMessage() for r in records)
    # Put right, the file is read again and the errors go.
    path.unlink()
    replacement = add_token(path, "c", "agent")
    assert store.reload() is True
    assert store.errors == []
    assert store.authenticate(_bearer(replacement)) == Principal("c", "agent")


def test_a_deleted_or_unreadable_file_keeps_the_tokens_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.yaml"
    token = _valid_file(path)
    store = TokenStore(path)
    with caplog.at_level(logging.ERROR, logger="scheduler.auth"):
        path.unlink()
        for _ in range(5):
            assert store.reload() is False
        path.mkdir()  # a directory where the file was
        for _ in range(5):
            assert store.reload() is False
        assert store.authenticate(_bearer(token)) == Principal("a", "agent")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "cannot read" in lines[0]


def test_an_empty_tokens_file_is_an_error_at_start(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    for data in (b"", b"\n\n", b"# nothing yet\n"):
        path.write_bytes(data)
        with pytest.raises(ConfigError) as caught:
            TokenStore(path)
        assert str(caught.value) == (
            f"{path}: no tokens: the file is empty (spillway token new --tokens-file {path} "
            "writes the first)"
        )
    path.write_text("tokens: []\n")  # written on purpose: nobody may call
    assert len(TokenStore(path)) == 0


def test_tokens_revoked_on_purpose_take_force(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    token = _valid_file(path)
    store = TokenStore(path)
    _rewrite(path, b"tokens: []\n")
    assert store.reload() is True
    assert store.authenticate(_bearer(token)) is None


def _issue_many(path: str, prefix: str, count: int) -> None:
    for i in range(count):
        add_token(Path(path), f"{prefix}-{i}", "agent")


def test_two_processes_issuing_tokens_into_one_file_lose_none(tmp_path: Path) -> None:
    """Two schedulers sharing a tokens file each issue tokens for the machines they launch."""
    import multiprocessing

    path = tmp_path / "tokens.yaml"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_issue_many, args=(str(path), name, 25)) for name in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    ids = {entry["id"] for entry in yaml.safe_load(path.read_text())["tokens"]}
    assert ids == {f"{p}-{i}" for p in ("a", "b") for i in range(25)}
