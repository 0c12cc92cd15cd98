"""Byte-range GETs over keep-alive HTTP/1.1 connections, written straight to a file descriptor.

Each worker thread owns its connections (one per origin) and one reusable buffer. On plain
HTTP under Linux a body goes socket -> pipe -> file with ``splice``: the kernel copies each
byte once, into the page cache, and no byte reaches Python. Over TLS (or where a file system
cannot take ``splice``) the buffer is filled from the socket with ``recv_into`` and written
with ``os.pwrite`` at its offset. Either way memory stays at one buffer (or pipe) per
connection whatever the file size, and every call releases the GIL, so a pool of threads keeps
the CPU in the kernel. A minimal HTTP/1.1 client is used instead of ``http.client`` because its
buffered reader cost about half again as much CPU per byte on a small machine.

Every answer's validators (its ETag, or without one its Last-Modified, and the total of its
Content-Range) are compared with those the object was listed with, and a 412 (a failed
``If-Match``) or a whole-object 200 to a conditional range (a failed ``If-Range``) is read the
same way: ``OriginChangedError``, before a byte of the body is written. That costs a few
dictionary look-ups per answer, on headers already read.

This module classifies failures into the prefetch error tree; it never retries (the engine
does) and knows nothing about stores or signatures.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

from agent.prefetch.errors import (
    AuthError,
    DiskFullError,
    NotFoundError,
    OriginChangedError,
    PrefetchError,
    TransferError,
)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_MAX_REDIRECTS = 5
_MAX_HEADER = 64 * 1024
_USER_AGENT = "spillway-prefetch/1"


class RetryableError(PrefetchError):
    """A failure worth another attempt: a reset, a timeout, a 5xx, a short body."""


def disk_error(exc: OSError, what: str) -> PrefetchError:
    """Turn an OSError from writing the destination into the matching prefetch error."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{what}: no space left on the destination ({exc.strerror})")
    return PrefetchError(f"{what}: {exc.strerror or exc}")


_SPLICE = hasattr(os, "splice")
_F_SETPIPE_SZ: int = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_BYTES = 1024 * 1024
_NO_SPLICE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class _Conn:
    """One keep-alive connection and the bytes read past the last response's headers.

    A plain-HTTP connection on Linux also owns a pipe: bodies move socket -> pipe -> file with
    ``splice``, so the kernel copies each byte once (into the page cache) instead of twice
    (into a user buffer, then into the page cache).
    """

    def __init__(self, sock: socket.socket, waitall: bool, splice: bool = False) -> None:
        self.sock = sock
        self.pending = b""
        self.flags = socket.MSG_WAITALL if waitall else 0
        self.pipe: tuple[int, int] | None = None
        self.pipe_bytes = 0
        if splice:
            read_end, write_end = os.pipe()
            try:
                self.pipe_bytes = fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:  # above /proc/sys/fs/pipe-max-size: keep the default size
                self.pipe_bytes = 64 * 1024
            self.pipe = (read_end, write_end)

    def drop_pipe(self) -> None:
        if self.pipe is not None:
            for end in self.pipe:
                with contextlib.suppress(OSError):
                    os.close(end)
            self.pipe = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.drop_pipe()


class Connections:
    """The calling thread's keep-alive connections, one per (scheme, host:port)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._ssl = ssl.create_default_context()
        self._all: set[_Conn] = set()
        self._all_lock = threading.Lock()
        self._aborted = False

    def _pool(self) -> dict[tuple[str, str], _Conn]:
        pool: dict[tuple[str, str], _Conn] | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = {}
            self._local.pool = pool
        return pool

    def get(self, scheme: str, netloc: str) -> _Conn:
        pool = self._pool()
        conn = pool.get((scheme, netloc))
        if conn is None:
            if scheme not in ("http", "https"):
                raise TransferError(f"unsupported URL scheme {scheme!r}")
            parts = urlsplit(f"{scheme}://{netloc}")
            host = parts.hostname or ""
            port = parts.port or (443 if scheme == "https" else 80)
            sock = socket.create_connection((host, port), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = self._ssl.wrap_socket(sock, server_hostname=host)
                conn = _Conn(sock, waitall=False)
            else:
                # Blocking, with the timeout enforced by the kernel, so that one
                # recv(MSG_WAITALL) fills a whole buffer: one system call and one GIL hand-off
                # per buffer instead of one per TCP segment batch.
                sock.settimeout(None)
                whole, frac = divmod(self.timeout_s, 1.0)
                timeval = struct.pack("ll", int(whole), int(frac * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
                conn = _Conn(sock, waitall=True, splice=_SPLICE)
            with self._all_lock:
                if self._aborted:
                    conn.close()
                    raise ConnectionAbortedError("the download is stopping")
                self._all.add(conn)
            pool[(scheme, netloc)] = conn
        return conn

    def abort_all(self) -> None:
        """Unblock every thread waiting on a socket (used when the download stops)."""
        with self._all_lock:
            self._aborted = True
            conns = list(self._all)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def drop(self, scheme: str, netloc: str) -> None:
        conn = self._pool().pop((scheme, netloc), None)
        if conn is not None:
            self._forget(conn)

    def close_all(self) -> None:
        pool = self._pool()
        for conn in pool.values():
            self._forget(conn)
        pool.clear()

    def _forget(self, conn: _Conn) -> None:
        with self._all_lock:
            self._all.discard(conn)
        conn.close()


class _Head:
    def __init__(self, status: int, reason: str, headers: dict[str, str]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers

    def get(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def will_close(self) -> bool:
        return (self.get("connection") or "").lower() == "close"


def _read_head(conn: _Conn) -> _Head:
    data = conn.pending
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(data) > _MAX_HEADER:
            raise TransferError("the origin sent more than 64 KiB of response headers")
        chunk = conn.sock.recv(16384)
        if not chunk:
            raise ConnectionResetError("the origin closed the connection before answering")
        data += chunk
    conn.pending = data[end + 4 :]
    lines = data[:end].decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
        raise TransferError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return _Head(int(status_line[1]), status_line[2] if len(status_line) > 2 else "", headers)


def _read_small_body(conn: _Conn, head: _Head, limit: int = 4096) -> bytes:
    """The start of an error or redirect body (empty if the connection fails meanwhile)."""
    try:
        return _read_small_body_or_raise(conn, head, limit)
    except OSError:
        return b""


def _read_small_body_or_raise(conn: _Conn, head: _Head, limit: int) -> bytes:
    length = head.get("content-length")
    want = min(int(length), limit) if length is not None and length.isdigit() else 0
    data = conn.pending
    while len(data) < want:
        chunk = conn.sock.recv(want - len(data))
        if not chunk:
            break
        data += chunk
    conn.pending = data[want:] if length is not None and int(length) <= limit else b""
    return data[:want]


def _describe(head: _Head, body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]+)</Code>", text)
    detail = code.group(1) if code else " ".join(text.split())[:200]
    return f"HTTP {head.status} {head.reason}".rstrip() + (f" ({detail})" if detail else "")


def _raise_for_status(head: _Head, body: bytes, what: str) -> None:
    status = head.status
    if status in (401, 403):
        raise AuthError(f"{what}: access denied: {_describe(head, body)}")
    if status in (404, 410):
        raise NotFoundError(f"{what}: not found: {_describe(head, body)}")
    if status == 412:
        raise OriginChangedError(
            f"{what}: the object changed at the origin ({_describe(head, body)}: it no longer "
            "matches the version that was listed)"
        )
    if status == 416:
        raise OriginChangedError(
            f"{what}: the object changed at the origin ({_describe(head, body)}: it is now "
            "shorter than the listing said)"
        )
    if status in (408, 425, 429) or status >= 500:
        raise RetryableError(f"{what}: {_describe(head, body)}")
    raise TransferError(f"{what}: unexpected answer {_describe(head, body)}")


def _same_date(a: str, b: str) -> bool:
    try:
        return parsedate_to_datetime(a) == parsedate_to_datetime(b)
    except (TypeError, ValueError):
        return False


def _check_validators(head: _Head, etag: str, last_modified: str, what: str) -> None:
    """Raise ``OriginChangedError`` unless the answer is of the version that was listed: its
    ETag (weak or strong alike) when both sides have one, else its Last-Modified."""
    got = head.get("etag")
    if etag and got:
        if got != etag and got.removeprefix("W/") != etag.removeprefix("W/"):
            raise OriginChangedError(
                f"{what}: the object changed at the origin (ETag {got}, listed as {etag})"
            )
        return
    modified = head.get("last-modified")
    changed = last_modified and modified and modified != last_modified
    if changed and not _same_date(modified or "", last_modified):
        raise OriginChangedError(
            f"{what}: the object changed at the origin (Last-Modified {modified}, "
            f"listed as {last_modified})"
        )


def _check_body_framing(head: _Head, start: int, length: int, whole_size: int, what: str) -> None:
    if "chunked" in (head.get("transfer-encoding") or "").lower():
        raise TransferError(f"{what}: the origin answered a range request with a chunked body")
    declared = head.get("content-length")
    if head.status == 206:
        match = _CONTENT_RANGE.fullmatch((head.get("content-range") or "").strip())
        if match is None:
            raise TransferError(f"{what}: a partial answer without a valid Content-Range header")
        first, last, total = int(match.group(1)), int(match.group(2)), match.group(3)
        if total != "*" and int(total) != whole_size:
            raise OriginChangedError(
                f"{what}: the object changed at the origin (it is now {total} bytes, the "
                f"listing said {whole_size})"
            )
        if first != start or last != start + length - 1:
            raise TransferError(
                f"{what}: asked for bytes {start}-{start + length - 1}, got {first}-{last}"
            )
    elif start == 0 and length == whole_size:
        if declared is not None and declared.isdigit() and int(declared) != whole_size:
            raise OriginChangedError(
                f"{what}: the object changed at the origin (it is now {declared} bytes, the "
                f"listing said {whole_size})"
            )
    else:
        raise TransferError(
            f"{what}: the origin ignored the Range header (HTTP 200 for bytes "
            f"{start}-{start + length - 1}); it cannot serve a parallel download"
        )
    if declared is None or not declared.isdigit() or int(declared) != length:
        raise TransferError(
            f"{what}: the origin announced {declared} bytes for a {length}-byte range"
        )


def fetch_range(
    conns: Connections,
    url: str,
    headers: dict[str, str],
    start: int,
    length: int,
    whole_size: int,
    fd: int,
    buf: memoryview,
    on_bytes: Callable[[int], None],
    stop: threading.Event,
    what: str,
    etag: str = "",
    last_modified: str = "",
) -> None:
    """GET bytes ``[start, start+length)`` of ``url`` and pwrite them at ``start`` into ``fd``.

    ``on_bytes`` is called after each write with the byte count, so a caller that retries knows
    how far the range got (it may raise ``RetryableError`` itself to abandon the range).
    ``headers`` carry the precondition (``If-Range``, ``If-Match``); ``etag`` and
    ``last_modified`` are the listed validators each answer is checked against. Raises
    ``RetryableError`` for transient failures, ``OriginChangedError`` when the answer is of
    another version than the listed one, and the matching ``PrefetchError`` for the rest.
    """
    for _ in range(_MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {parts.netloc}",
            f"User-Agent: {_USER_AGENT}",
            "Accept-Encoding: identity",
            f"Range: bytes={start}-{start + length - 1}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        reusable = False
        try:
            try:
                conn = conns.get(parts.scheme, parts.netloc)
                conn.sock.sendall(request)
                head = _read_head(conn)
            except OSError as exc:
                raise RetryableError(f"{what}: {type(exc).__name__}: {exc}") from exc
            location = head.get("location")
            if head.status in (301, 302, 303, 307, 308) and location:
                _read_small_body(conn, head)
                url = urljoin(url, location)
                continue
            if head.status not in (200, 206):
                _raise_for_status(head, _read_small_body(conn, head), what)
            _check_validators(head, etag, last_modified, what)
            _check_body_framing(head, start, length, whole_size, what)
            _copy_body(conn, start, length, fd, buf, on_bytes, stop, what)
            reusable = not head.will_close
        finally:
            if not reusable:
                conns.drop(parts.scheme, parts.netloc)
        return
    raise TransferError(f"{what}: more than {_MAX_REDIRECTS} redirects")


def _copy_body(
    conn: _Conn,
    start: int,
    length: int,
    fd: int,
    buf: memoryview,
    on_bytes: Callable[[int], None],
    stop: threading.Event,
    what: str,
) -> None:
    offset = start
    remaining = length
    pending = conn.pending[:remaining]
    conn.pending = conn.pending[len(pending) :]
    if pending:
        _write(fd, memoryview(pending), offset, what)
        offset += len(pending)
        remaining -= len(pending)
        on_bytes(len(pending))
    if conn.pipe is not None:
        moved = _splice_body(conn, conn.pipe, offset, remaining, fd, buf, on_bytes, stop, what)
        offset += moved
        remaining -= moved
    size = len(buf)
    recv_into = conn.sock.recv_into
    flags = conn.flags
    while remaining > 0:
        if stop.is_set():
            raise RetryableError(f"{what}: stopped")
        want = size if remaining > size else remaining
        got = 0
        try:
            while got < want:
                n = recv_into(buf[got:want], want - got, flags)
                if n == 0:
                    break
                got += n
        except OSError as exc:
            if got:
                _write(fd, buf[:got], offset, what)
                on_bytes(got)
            raise RetryableError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if got:
            _write(fd, buf[:got], offset, what)
            offset += got
            remaining -= got
            on_bytes(got)
        if got < want:
            raise RetryableError(f"{what}: the body ended {remaining} bytes early")


def _splice_body(
    conn: _Conn,
    pipe: tuple[int, int],
    offset: int,
    remaining: int,
    fd: int,
    buf: memoryview,
    on_bytes: Callable[[int], None],
    stop: threading.Event,
    what: str,
) -> int:
    """Move up to ``remaining`` body bytes from the socket to ``fd`` at ``offset`` through the
    pipe; return how many were moved.

    That is all of them, unless the destination's file system cannot take ``splice``: then
    the connection drops its pipe and the caller copies the rest through ``buf``. The pipe is
    emptied into the file after every fill, so it never holds bytes that were counted; when
    anything fails the caller drops the connection, and the pipe with it.
    """
    read_end, write_end = pipe
    sock_fd = conn.sock.fileno()
    splice = os.splice
    moved_total = 0
    while remaining > 0:
        if stop.is_set():
            raise RetryableError(f"{what}: stopped")
        want = conn.pipe_bytes if remaining > conn.pipe_bytes else remaining
        try:
            got = splice(sock_fd, write_end, want)
        except OSError as exc:
            raise RetryableError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if got == 0:
            raise RetryableError(f"{what}: the body ended {remaining} bytes early")
        moved = 0
        try:
            while moved < got:
                moved += splice(read_end, fd, got - moved, offset_dst=offset + moved)
        except OSError as exc:
            if moved:
                on_bytes(moved)
            if exc.errno not in _NO_SPLICE or moved:
                raise disk_error(exc, what) from exc
            # This file system has no splice support: write the piped bytes the plain way
            # and let this connection copy through a buffer from now on.
            while moved < got:
                n = os.readv(read_end, [buf[: min(len(buf), got - moved)]])
                _write(fd, buf[:n], offset + moved, what)
                moved += n
            on_bytes(moved)
            conn.drop_pipe()
            return moved_total + moved
        offset += got
        remaining -= got
        moved_total += got
        on_bytes(got)
    return moved_total


def _write(fd: int, data: memoryview, offset: int, what: str) -> None:
    written = 0
    while written < len(data):
        try:
            written += os.pwrite(fd, data[written:], offset + written)
        except OSError as exc:
            raise disk_error(exc, what) from exc
