"""Checks on a downloaded file: streaming digests (sha256 always, plus whatever the store
reports) and a sanity check of a ``.safetensors`` header.

Digests are computed from the file on disk, read back in order as its prefix completes, so a
resumed download is verified exactly like a fresh one. Nothing here touches the network.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from agent.prefetch.errors import InvalidSourceError, VerificationError

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


class _Crc32c:
    """crc32c through google-crc32c (installed with the GCS SDK); only built when needed."""

    def __init__(self) -> None:
        try:
            module: Any = importlib.import_module("google_crc32c")
        except ImportError as exc:
            raise InvalidSourceError(
                "verifying a crc32c needs the google-crc32c package (pip install google-crc32c)"
            ) from exc
        self._value: Any = module.Checksum()

    def update(self, data: bytes | memoryview, /) -> None:
        self._value.update(bytes(data))

    def hexdigest(self) -> str:
        return bytes(self._value.digest()).hex()


def new_hash(algorithm: str) -> _Hash:
    if algorithm == "crc32c":
        return _Crc32c()
    return hashlib.new(algorithm)


def b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helpers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefetch-digest")
        return _pool


class Digests:
    """sha256 (unless turned off) plus the algorithms the store gave an expected value for.

    With more than one algorithm each chunk is hashed by all of them at once on helper threads
    (the hash functions release the GIL), so an MD5 check does not double the wall time.
    """

    SUPPORTED = ("md5", "sha256", "crc32c")

    def __init__(self, expected: dict[str, str], sha256: bool = True) -> None:
        self.expected = {k: v.lower() for k, v in expected.items() if k in self.SUPPORTED}
        self._hashes: dict[str, _Hash] = {"sha256": new_hash("sha256")} if sha256 else {}
        for algorithm in self.expected:
            if algorithm not in self._hashes:
                self._hashes[algorithm] = new_hash(algorithm)
        self.position = 0

    def update(self, data: memoryview) -> None:
        hashes = list(self._hashes.values())
        if len(hashes) > 1:
            futures = [_helpers().submit(h.update, data) for h in hashes[1:]]
            hashes[0].update(data)
            for future in futures:
                future.result()
        elif hashes:
            hashes[0].update(data)
        self.position += len(data)

    def finish(self, what: str) -> tuple[str, list[str]]:
        """The sha256 ("" when off) and the algorithms verified; raises on a mismatch."""
        verified: list[str] = []
        for algorithm, want in sorted(self.expected.items()):
            got = self._hashes[algorithm].hexdigest()
            if got != want:
                raise VerificationError(
                    f"{what}: {algorithm} mismatch: the store says {want}, the bytes written "
                    f"hash to {got}"
                )
            verified.append(algorithm)
        sha = self._hashes.get("sha256")
        return (sha.hexdigest() if sha is not None else ""), verified


def check_safetensors(fd: int, size: int, what: str) -> None:
    """Raise unless ``fd`` starts with a plausible safetensors header that fits ``size``."""
    if size < 8:
        raise VerificationError(f"{what}: {size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
        raise VerificationError(
            f"{what}: safetensors header length {header_len} does not fit a {size}-byte file"
        )
    raw = os.pread(fd, header_len, 8)
    try:
        header: Any = json.loads(raw)
    except ValueError as exc:
        raise VerificationError(f"{what}: the safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise VerificationError(f"{what}: the safetensors header is not a JSON object")
    data_len = size - 8 - header_len
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise VerificationError(f"{what}: safetensors entry {name!r} is not an object")
        offsets = info.get("data_offsets")
        shape = info.get("shape")
        dtype = info.get("dtype")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(v, int) for v in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise VerificationError(
                f"{what}: tensor {name!r} has data_offsets {offsets!r} outside the "
                f"{data_len}-byte data section"
            )
        if isinstance(shape, list) and dtype in _DTYPE_BYTES:
            count = 1
            for dim in shape:
                count *= int(dim)
            if count * _DTYPE_BYTES[str(dtype)] != offsets[1] - offsets[0]:
                raise VerificationError(
                    f"{what}: tensor {name!r} ({dtype} {shape}) does not match its "
                    f"{offsets[1] - offsets[0]}-byte extent"
                )
        end_max = max(end_max, offsets[1])
    if end_max != data_len:
        raise VerificationError(
            f"{what}: the tensors end at byte {end_max} of a {data_len}-byte data section"
        )
