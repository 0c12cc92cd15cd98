"""Plain data shared by the sources, the engine and the activity: what an object is, how a
download is tuned, and what a finished download reports.

Only dataclasses and small pure helpers live here; no I/O.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from agent.prefetch.errors import InvalidSourceError

MiB = 1024 * 1024


@dataclass(frozen=True)
class RemoteObject:
    """One file to fetch: where it goes under the destination and a URL that accepts ``Range``.

    ``checksums`` maps an algorithm (``md5``, ``sha256``, ``crc32c``) to the hex digest the store
    reports; ``version`` (an ETag, a generation) identifies the content so that a resume never
    mixes bytes of two versions.
    """

    path: str
    size: int
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    version: str = ""

    def identity(self) -> str:
        """What must not change between an interrupted run and its resumption."""
        sums = ",".join(f"{k}={v}" for k, v in sorted(self.checksums.items()))
        return f"{self.size}|{self.version}|{sums}"


@dataclass
class Tuning:
    """Knobs of the engine. ``None`` means "choose from the object sizes and the throughput"."""

    connections: int | None = None
    max_connections: int = 64
    range_size: int | None = None
    buffer_size: int = 1 * MiB
    retries: int = 6
    backoff_s: float = 0.2
    max_backoff_s: float = 8.0
    timeout_s: float = 30.0
    checksum_retries: int = 1
    sha256: bool = True
    fsync: bool = True
    state_interval_s: float = 1.0


@dataclass
class FileResult:
    path: str
    size: int
    sha256: str
    verified_with: list[str]
    fetched_bytes: int
    skipped: bool


@dataclass
class PrefetchResult:
    destination: str
    files: list[FileResult]
    total_bytes: int
    fetched_bytes: int
    resumed_bytes: int
    seconds: float
    connections: int
    range_size: int

    @property
    def mb_per_s(self) -> float:
        return self.fetched_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def safe_relpath(key: str) -> str:
    """A store key turned into a relative path that cannot leave the destination directory."""
    cleaned = posixpath.normpath(key.replace("\\", "/")).lstrip("/")
    if cleaned in ("", ".") or cleaned == ".." or cleaned.startswith("../"):
        raise InvalidSourceError(f"object key {key!r} does not name a file inside the destination")
    return cleaned
