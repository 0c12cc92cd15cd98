"""The Azure Blob source against Azurite (from npm, installed by .ci/run under .tools/) on
loopback: account-key SAS, Content-MD5 verification, a wrong key, missing container."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.prefetch import AuthError, Engine, NotFoundError, prefetch
from tests.agent.prefetch.conftest import fast_tuning, free_port, stop, wait_port

blob: Any = pytest.importorskip("azure.storage.blob")
MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[3]
# Azurite's documented development account (the same for every Azurite install).
ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _azurite() -> str | None:
    local = ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if local.exists() else shutil.which("azurite-blob")


def _connection(port: int, key: str = DEV_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


@pytest.fixture(scope="module")
def azurite_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = _azurite()
    if binary is None or shutil.which("node") is None:
        pytest.skip("Azurite is not installed (npm install azurite into .tools/azurite); .ci/run")
    work = tmp_path_factory.mktemp("azurite")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--location",
            str(work),
            "--loose",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ],
        stdout=(work / "azurite.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, process, "azurite-blob", timeout=60)
        yield port
    finally:
        stop(process)


@pytest.fixture
def service(azurite_port: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _connection(azurite_port))
    return blob.BlobServiceClient.from_connection_string(_connection(azurite_port))


def _upload(service: Any, container: str, prefix: str) -> dict[str, bytes]:
    box = service.get_container_client(container)
    if not box.exists():
        box.create_container()
    files = {
        "config.json": b'{"vocab_size": 32000}',
        "model.bin": os.urandom(2 * MiB + 3),
        "extra/tokenizer.model": os.urandom(123_456),
    }
    for rel, data in files.items():
        box.upload_blob(f"{prefix}/{rel}", data, overwrite=True)
    return files


def test_prefix_from_azurite_with_content_md5(service: Any, tmp_path: Path) -> None:
    files = _upload(service, "models", "tiny")
    result = prefetch("az://models/tiny/", tmp_path, tuning=fast_tuning())
    for rel, data in files.items():
        assert (tmp_path / rel).read_bytes() == data
    by_path = {f.path: f for f in result.files}
    assert set(by_path) == set(files)
    assert all(f.verified_with == ["md5"] for f in result.files)
    assert by_path["model.bin"].sha256 == hashlib.sha256(files["model.bin"]).hexdigest()


def test_single_blob(service: Any, tmp_path: Path) -> None:
    files = _upload(service, "models", "one")
    result = prefetch("az://models/one/model.bin", tmp_path, tuning=fast_tuning())
    assert [f.path for f in result.files] == ["model.bin"]
    assert (tmp_path / "model.bin").read_bytes() == files["model.bin"]
    # With cp semantics (the CLI) a blob names the file itself; a prefix a directory.
    prefetch("az://models/one/model.bin", tmp_path / "w.bin", tuning=fast_tuning(), copy=True)
    assert (tmp_path / "w.bin").read_bytes() == files["model.bin"]
    prefetch("az://models/one", tmp_path / "dir", tuning=fast_tuning(), copy=True)
    assert (tmp_path / "dir" / "model.bin").read_bytes() == files["model.bin"]


def test_wrong_key_is_an_auth_error(
    service: Any, azurite_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _upload(service, "models", "locked")
    wrong = DEV_KEY[:-8] + "AAAAAA=="
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _connection(azurite_port, wrong))
    with pytest.raises(AuthError, match="access denied"):
        prefetch("az://models/locked/", tmp_path, tuning=fast_tuning())


def test_missing_container_and_prefix_are_not_found(service: Any, tmp_path: Path) -> None:
    _upload(service, "models", "present")
    with pytest.raises(NotFoundError, match="not found"):
        prefetch("az://no-such-container/x/", tmp_path, tuning=fast_tuning())
    with pytest.raises(NotFoundError, match="no blobs"):
        prefetch("az://models/absent/", tmp_path, tuning=fast_tuning())


def test_blob_overwritten_after_listing_is_fetched_as_the_new_version(
    service: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every SAS range carries ``If-Match`` with the listed ETag: Azurite answers 412
    (ConditionNotMet) for the overwritten blob, and the new version is fetched and verified."""
    box = service.get_container_client("models")
    if not box.exists():
        box.create_container()
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)
    box.upload_blob("swap/w.bin", old, overwrite=True)

    def overwrite(_: Engine) -> None:  # after the listing, before the first range
        box.upload_blob("swap/w.bin", new, overwrite=True)

    result = prefetch("az://models/swap/", tmp_path, tuning=fast_tuning(), engine_ready=overwrite)
    assert (tmp_path / "w.bin").read_bytes() == new
    assert "fetching the new version from the start" in caplog.text
    assert result.files[0].verified_with == ["md5"]
