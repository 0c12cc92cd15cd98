"""Plain HTTP(S) origins: one file URL, or a base URL ending in ``/`` plus a list of files.

Sizes come from ``HEAD`` (or a one-byte ranged GET where ``HEAD`` is refused). An ETag of 64 hex
digits (as model hubs give for large files) is taken as the file's sha256; a file list entry may
also carry one (``name sha256``). The ETag and Last-Modified of that answer become the
``If-Range`` validator of every range. Only the standard library is used, no SDK.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote, urljoin

from agent.prefetch.errors import (
    AuthError,
    InvalidSourceError,
    NotFoundError,
    PrefetchError,
    TransferError,
)
from agent.prefetch.model import RemoteObject, safe_relpath
from agent.prefetch.sources.base import Listing, SourceOptions

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_TOTAL = re.compile(r"bytes \d+-\d+/(\d+)")


def _error(url: str, exc: urllib.error.HTTPError) -> PrefetchError:
    if exc.code in (401, 403):
        return AuthError(f"{url}: access denied (HTTP {exc.code} {exc.reason})")
    if exc.code in (404, 410):
        return NotFoundError(f"{url}: not found (HTTP {exc.code})")
    return TransferError(f"{url}: HTTP {exc.code} {exc.reason}")


@dataclass
class _Probe:
    size: int
    version: str  # X-Linked-Etag (a model hub's content hash) or else the ETag
    etag: str  # the ETag of the answer itself, the one that range answers carry
    last_modified: str


def _probe(url: str, timeout_s: float = 30.0) -> _Probe:
    """Size and validators of ``url``."""
    for method, headers in (("HEAD", {}), ("GET", {"Range": "bytes=0-0"})):
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                etag = resp.headers.get("ETag") or ""
                version = resp.headers.get("X-Linked-Etag") or etag
                modified = resp.headers.get("Last-Modified") or ""
                linked = resp.headers.get("X-Linked-Size")
                if method == "GET":
                    total = _CONTENT_RANGE_TOTAL.fullmatch(resp.headers.get("Content-Range", ""))
                    if total is None:
                        raise TransferError(f"{url}: the origin does not honour Range requests")
                    return _Probe(int(total.group(1)), version, etag, modified)
                length = linked or resp.headers.get("Content-Length")
                if length is not None:
                    return _Probe(int(length), version, etag, modified)
        except urllib.error.HTTPError as exc:
            if method == "HEAD" and exc.code in (405, 501):
                continue
            raise _error(url, exc) from exc
        except (OSError, ValueError) as exc:
            raise TransferError(f"{url}: cannot reach the origin: {exc}") from exc
    raise TransferError(f"{url}: the origin gives no size for this file")


def _object(url: str, path: str, sha256: str | None) -> RemoteObject:
    probe = _probe(url)
    bare = probe.version.removeprefix("W/").strip('"').lower()
    checksums: dict[str, str] = {}
    if sha256:
        checksums["sha256"] = sha256.lower()
    elif _SHA256.fullmatch(bare):
        checksums["sha256"] = bare
    return RemoteObject(
        path=path,
        size=probe.size,
        url=url,
        checksums=checksums,
        version=bare,
        etag=probe.etag,
        last_modified=probe.last_modified,
        precondition="if-range",
    )


def parse_file_list(lines: list[str]) -> list[tuple[str, str | None]]:
    """Entries ``name`` or ``name sha256``; blank lines and ``#`` comments are ignored."""
    entries: list[tuple[str, str | None]] = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) > 2 or (len(fields) == 2 and not _SHA256.fullmatch(fields[1].lower())):
            raise InvalidSourceError(f"file list entry {text!r}: expected 'name [sha256]'")
        entries.append((fields[0], fields[1] if len(fields) == 2 else None))
    return entries


def resolve_http(uri: str, options: SourceOptions) -> Listing:
    if not uri.endswith("/"):
        if options.files:
            raise InvalidSourceError(f"{uri!r}: a file list needs a base URL ending in '/'")
        name = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return Listing([_object(uri, safe_relpath(name), None)], single=True)
    entries = parse_file_list(options.files)
    if not entries:
        raise InvalidSourceError(
            f"{uri!r} is a directory URL: name the files to fetch (--file NAME or --files-from)"
        )
    with ThreadPoolExecutor(max_workers=min(16, len(entries))) as pool:
        futures = [
            pool.submit(_object, urljoin(uri, quote(name)), safe_relpath(name), sha)
            for name, sha in entries
        ]
        return Listing([future.result() for future in futures])
