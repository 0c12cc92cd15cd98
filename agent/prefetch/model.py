"""Plain data shared by the sources, the engine and the activity: what an object is, how a
download is tuned, and what a finished download reports.

Only dataclasses and small pure helpers live here; no I/O.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime

from agent.prefetch.errors import InvalidSourceError

MiB = 1024 * 1024


@dataclass(frozen=True)
class RemoteObject:
    """One file to fetch: where it goes under the destination and a URL that accepts ``Range``.

    ``checksums`` maps an algorithm (``md5``, ``sha256``, ``crc32c``) to the hex digest the store
    reports; ``version`` (an ETag, a generation) identifies the content so that a resume never
    mixes bytes of two versions.

    ``etag`` (exactly as the origin sends it, quotes included) and ``last_modified`` (an
    HTTP-date) are the validators seen at listing time: every range request is made
    conditional on them (``precondition``: ``if-range`` for plain HTTP origins, ``if-match``
    for stores that answer 412 instead, such as S3 and Azure Blob; empty where the URL itself
    pins the version, as GCS's ``generation=`` does), and every response's own ETag or
    Last-Modified is compared with them.
    """

    path: str
    size: int
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    version: str = ""
    etag: str = ""
    last_modified: str = ""
    precondition: str = ""

    def identity(self) -> str:
        """What must not change between a finished download and a later run (the manifest).

        Without a version (an origin with no ETag) the Last-Modified date stands in for it.
        """
        sums = ",".join(f"{k}={v}" for k, v in sorted(self.checksums.items()))
        base = f"{self.size}|{self.version}|{sums}"
        return base if self.version or not self.last_modified else f"{base}|{self.last_modified}"

    def resume_key(self) -> str:
        """What must not change between an interrupted run and its resumption: the identity
        plus both validators, so that saved ranges are trusted only when a fresh listing still
        shows the very same ETag and Last-Modified."""
        sums = ",".join(f"{k}={v}" for k, v in sorted(self.checksums.items()))
        key = f"{self.size}|{self.version}|{sums}"
        if self.etag:
            key += f"|etag={self.etag}"
        if self.last_modified:
            key += f"|last-modified={self.last_modified}"
        return key

    def request_headers(self) -> dict[str, str]:
        """The object's own headers plus the precondition that ties each range to the version
        that was listed (a weak ETag cannot be used in one: then the date is)."""
        headers = dict(self.headers)
        strong = self.etag if self.etag and not self.etag.startswith("W/") else ""
        if self.precondition == "if-range" and (strong or self.last_modified):
            headers["If-Range"] = strong or self.last_modified
        elif self.precondition == "if-match":
            if strong:
                headers["If-Match"] = strong
            elif self.last_modified:
                headers["If-Unmodified-Since"] = self.last_modified
        return headers


def http_date(when: datetime) -> str:
    """A timestamp as an HTTP-date (whole seconds, GMT), as stores send Last-Modified."""
    return format_datetime(when.astimezone(UTC).replace(microsecond=0), usegmt=True)


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
class Progress:
    """A snapshot for progress displays."""

    total_bytes: int
    done_bytes: int
    fetched_bytes: int
    files_total: int
    files_done: int
    bytes_per_s: float
    connections: int
    elapsed_s: float


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
