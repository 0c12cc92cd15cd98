"""Plain HTTP(S) origins: one file URL, or a base URL ending in ``/`` plus a list of files.

Sizes come from ``HEAD`` (or a one-byte ranged GET where ``HEAD`` is refused). An ETag of 64 hex
digits (as model hubs give for large files) is taken as the file's sha256; a file list entry may
also carry one (``name sha256``). Only the standard library is used, no SDK.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote, urljoin

from agent.prefetch.errors import (
    AuthError,
    InvalidSourceError,
    NotFoundError,
    PrefetchError,
    TransferError,
)
from agent.prefetch.model import RemoteObject, safe_relpath
from agent.prefetch.sources.base import SourceOptions

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_TOTAL = re.compile(r"bytes \d+-\d+/(\d+)")


def _error(url: str, exc: urllib.error.HTTPError) -> PrefetchError:
    if exc.code in (401, 403):
        return AuthError(f"{url}: access denied (HTTP {exc.code} {exc.reason})")
    if exc.code in (404, 410):
        return NotFoundError(f"{url}: not found (HTTP {exc.code})")
    return TransferError(f"{url}: HTTP {exc.code} {exc.reason}")


def _probe(url: str, timeout_s: float = 30.0) -> tuple[int, str]:
    """(size, etag) of ``url``."""
    for method, headers in (("HEAD", {}), ("GET", {"Range": "bytes=0-0"})):
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                etag = resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag") or ""
                linked = resp.headers.get("X-Linked-Size")
                if method == "GET":
                    total = _CONTENT_RANGE_TOTAL.fullmatch(resp.headers.get("Content-Range", ""))
                    if total is None:
                        raise TransferError(f"{url}: the origin does not honour Range requests")
                    return int(total.group(1)), etag
                length = linked or resp.headers.get("Content-Length")
                if length is not None:
                    return int(length), etag
        except urllib.error.HTTPError as exc:
            if method == "HEAD" and exc.code in (405, 501):
                continue
            raise _error(url, exc) from exc
        except (OSError, ValueError) as exc:
            raise TransferError(f"{url}: cannot reach the origin: {exc}") from exc
    raise TransferError(f"{url}: the origin gives no size for this file")


def _object(url: str, path: str, sha256: str | None) -> RemoteObject:
    size, etag = _probe(url)
    bare = etag.removeprefix("W/").strip('"').lower()
    checksums: dict[str, str] = {}
    if sha256:
        checksums["sha256"] = sha256.lower()
    elif _SHA256.fullmatch(bare):
        checksums["sha256"] = bare
    return RemoteObject(path=path, size=size, url=url, checksums=checksums, version=bare)


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


def resolve_http(uri: str, options: SourceOptions) -> list[RemoteObject]:
    if not uri.endswith("/"):
        if options.files:
            raise InvalidSourceError(f"{uri!r}: a file list needs a base URL ending in '/'")
        name = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return [_object(uri, safe_relpath(name), None)]
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
        return [future.result() for future in futures]
