"""The engine over plain HTTP against a real nginx: whole directories, single files, many
ranges per file, verification data in the manifest, and re-runs that fetch nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from agent.prefetch import Engine, InvalidSourceError, NotFoundError, SourceOptions, prefetch
from agent.prefetch.state import STATE_DIR
from tests.agent.prefetch.conftest import Nginx, fast_tuning, safetensors_bytes


def _tree(root: Path, name: str) -> dict[str, bytes]:
    files = {
        "config.json": b'{"architectures": ["Tiny"]}',
        "empty.txt": b"",
        "model-00001-of-00002.safetensors": safetensors_bytes({"a": 300_000, "b": 123_457}),
        "model-00002-of-00002.safetensors": safetensors_bytes({"c": 200_001}),
        "sub/tokenizer.json": os.urandom(70_000),
    }
    for rel, data in files.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_directory_from_nginx_is_complete_verified_and_recorded(
    nginx: Nginx, tmp_path: Path
) -> None:
    files = _tree(nginx.root, "tiny")
    dest = tmp_path / "model"
    result = prefetch(nginx.base + "tiny/", dest, SourceOptions(files=list(files)), fast_tuning())
    assert result.total_bytes == sum(len(d) for d in files.values())
    assert result.fetched_bytes == result.total_bytes
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data, rel
    manifest = json.loads((dest / STATE_DIR / "manifest.json").read_text())["files"]
    for rel, data in files.items():
        assert manifest[rel]["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest[rel]["size"] == len(data)
    assert "safetensors-header" in manifest["model-00001-of-00002.safetensors"]["verified_with"]
    assert not (dest / STATE_DIR / "partial").exists()
    assert not (dest / STATE_DIR / "progress.json").exists()


def test_second_run_fetches_nothing(nginx: Nginx, tmp_path: Path) -> None:
    files = _tree(nginx.root, "again")
    dest = tmp_path / "model"
    first = prefetch(nginx.base + "again/", dest, SourceOptions(files=list(files)), fast_tuning())
    second = prefetch(nginx.base + "again/", dest, SourceOptions(files=list(files)), fast_tuning())
    assert first.fetched_bytes > 0
    assert second.fetched_bytes == 0
    assert all(f.skipped for f in second.files)


def test_changed_origin_file_is_fetched_again(nginx: Nginx, tmp_path: Path) -> None:
    files = _tree(nginx.root, "changed")
    dest = tmp_path / "model"
    prefetch(nginx.base + "changed/", dest, SourceOptions(files=list(files)), fast_tuning())
    new = os.urandom(90_001)
    (nginx.root / "changed" / "sub" / "tokenizer.json").write_bytes(new)
    again = prefetch(nginx.base + "changed/", dest, SourceOptions(files=list(files)), fast_tuning())
    assert again.fetched_bytes == len(new)
    assert (dest / "sub" / "tokenizer.json").read_bytes() == new


def test_single_file_url(nginx: Nginx, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (nginx.root / "single.bin").write_bytes(data)
    result = prefetch(nginx.base + "single.bin", tmp_path, tuning=fast_tuning(connections=8))
    assert (tmp_path / "single.bin").read_bytes() == data
    assert [f.path for f in result.files] == ["single.bin"]


def test_missing_file_is_not_found(nginx: Nginx, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"nope\.bin"):
        prefetch(nginx.base + "nope.bin", tmp_path, tuning=fast_tuning())


def test_directory_url_needs_a_file_list(nginx: Nginx, tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="name the files"):
        prefetch(nginx.base, tmp_path, tuning=fast_tuning())


def test_file_replaced_after_listing_is_fetched_as_the_new_version(
    nginx: Nginx, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nginx answers a stale ``If-Range`` with the whole new file (200): the first range finds
    the new ETag, the engine lists the file again and fetches the new version."""
    path = nginx.root / "replaced.bin"
    old, new = os.urandom(3 * 1024 * 1024), os.urandom(3 * 1024 * 1024)
    path.write_bytes(old)
    listed = os.stat(path).st_mtime

    def overwrite(_: Engine) -> None:  # after the listing, before the first range
        path.write_bytes(new)
        os.utime(path, (listed + 10, listed + 10))  # nginx's ETag is size and whole seconds

    result = prefetch(
        nginx.base + "replaced.bin", tmp_path, tuning=fast_tuning(), engine_ready=overwrite
    )
    assert (tmp_path / "replaced.bin").read_bytes() == new
    assert "fetching the new version from the start" in caplog.text
    assert result.files[0].sha256 == hashlib.sha256(new).hexdigest()
