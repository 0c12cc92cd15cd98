"""A small HTTP origin for prefetch tests that serves files with ``Range`` support and injects
faults on demand: connection resets mid-body, 5xx answers, truncated bodies, corrupted bytes,
403/404, an object replaced between two requests, and a byte-rate throttle. It counts the body
bytes it sends per file, so tests can assert exactly how much was fetched (and fetched twice).

Per file it can send an ETag and a Last-Modified date (each new version gets new ones) and
honour ``If-Range`` (RFC 9110: a validator that no longer matches turns a range request into a
200 with the whole object; or it ignores the header, as S3-compatible stores do), ``If-Match``
and ``If-Unmodified-Since`` (412 once the object changed).

Test-only: it binds to loopback and is never used by the product code.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
STALL_S = 3.0
# Last-Modified of a file's first version; each later version is one second younger.
EPOCH = 1_700_000_000


@dataclass
class Fault:
    """``kind``: ``reset``, ``truncate`` (after ``after`` body bytes), ``stall`` (send ``after``
    body bytes, then nothing for STALL_S seconds, then close), ``status`` (answer ``status``),
    ``corrupt`` (flip one byte), ``change`` (replace the object by ``data``, a new version
    with a new ETag and Last-Modified, then answer the request). ``times`` faults are served
    (None: forever); ``skip`` requests pass untouched first."""

    kind: str
    times: int | None = 1
    after: int = 0
    status: int = 503
    skip: int = 0
    data: bytes = b""


@dataclass
class _Meta:
    etag: bool
    last_modified: bool
    if_range: bool
    version: int = 0


class FaultyOrigin:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[Fault]] = {}
        self.served: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.injected: dict[str, int] = {}
        self.meta: dict[str, _Meta] = {}
        self.rate: float | None = None
        self.active = 0
        self.lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_HEAD(self) -> None:
                origin._handle(self, head=True)

            def do_GET(self) -> None:
                origin._handle(self, head=False)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                return  # clients that reset or are killed mid-body are part of the tests

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(
        self,
        name: str,
        data: bytes,
        *faults: Fault,
        etag: bool = False,
        last_modified: bool = False,
        if_range: bool = True,
    ) -> str:
        """Serve ``data`` as ``name``, with an ETag and/or Last-Modified when asked; with
        ``if_range`` False the ``If-Range`` header is ignored."""
        with self.lock:
            self.files[name] = data
            self.faults[name] = list(faults)
            self.served[name] = 0
            self.requests[name] = 0
            self.meta[name] = _Meta(etag, last_modified, if_range)
        return self.base + name

    def replace(self, name: str, data: bytes) -> None:
        """A new version of ``name``: new bytes, ETag and Last-Modified."""
        with self.lock:
            self.files[name] = data
            self.meta[name].version += 1

    def validators(self, name: str) -> tuple[str | None, str | None]:
        """The (ETag, Last-Modified) ``name`` is served with now (None when not sent)."""
        with self.lock:
            meta = self.meta[name]
            return (
                f'"v{meta.version}-{len(self.files[name]):x}"' if meta.etag else None,
                formatdate(EPOCH + meta.version, usegmt=True) if meta.last_modified else None,
            )

    def set_faults(self, name: str, *faults: Fault) -> None:
        with self.lock:
            self.faults[name] = list(faults)

    def reset_counts(self) -> None:
        with self.lock:
            for name in self.served:
                self.served[name] = 0
                self.requests[name] = 0
            self.injected.clear()

    def _next_fault(self, name: str) -> Fault | None:
        with self.lock:
            self.requests[name] += 1
            for fault in self.faults.get(name, []):
                if fault.skip > 0:
                    fault.skip -= 1
                    return None
                if fault.times is None or fault.times > 0:
                    if fault.times is not None:
                        fault.times -= 1
                    self.injected[fault.kind] = self.injected.get(fault.kind, 0) + 1
                    return fault
            return None

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no response is being sent (say, to a client that was just killed)."""
        deadline = time.monotonic() + timeout
        while self.active:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.active} responses still being sent")
            time.sleep(0.01)

    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        with self.lock:
            self.active += 1
        try:
            self._answer(req, head)
        finally:
            with self.lock:
                self.active -= 1

    def _answer(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        name = req.path.lstrip("/").split("?", 1)[0]
        data = self.files.get(name)
        fault = None if head else self._next_fault(name) if data is not None else None
        if data is not None and fault is not None and fault.kind == "change":
            self.replace(name, fault.data)
            data, fault = fault.data, None
        etag, modified = self.validators(name) if data is not None else (None, None)
        if data is not None and not self._preconditions_hold(req, etag, modified):
            fault = Fault("status", status=412)
        if data is None or (fault is not None and fault.kind == "status"):
            status = 404 if data is None else fault.status if fault else 500
            body = f"status {status}\n".encode()
            req.send_response(status)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            if not head:
                req.wfile.write(body)
            return
        start, end = 0, len(data) - 1
        header = req.headers.get("Range")
        if header and not self._if_range_holds(req, name, etag, modified):
            header = None  # the client's copy is stale: send the whole current object
        partial = False
        if header:
            match = _RANGE.fullmatch(header.strip())
            if match is None or int(match.group(1)) >= len(data):
                req.send_response(416)
                req.send_header("Content-Length", "0")
                req.end_headers()
                return
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else end, len(data) - 1)
            partial = True
        body = data[start : end + 1]
        req.send_response(206 if partial else 200)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Accept-Ranges", "bytes")
        if etag is not None:
            req.send_header("ETag", etag)
        if modified is not None:
            req.send_header("Last-Modified", modified)
        if partial:
            req.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        req.end_headers()
        if head:
            return
        if fault is not None and fault.kind == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        limit = len(body)
        if fault is not None and fault.kind in ("reset", "truncate", "stall"):
            limit = min(fault.after, len(body))
        self._send(req, name, memoryview(body)[:limit])
        if fault is not None and fault.kind == "reset":
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            req.close_connection = True
            req.connection.close()
        elif fault is not None and fault.kind == "truncate":
            req.close_connection = True
        elif fault is not None and fault.kind == "stall":
            time.sleep(STALL_S)
            req.close_connection = True

    @staticmethod
    def _preconditions_hold(
        req: BaseHTTPRequestHandler, etag: str | None, modified: str | None
    ) -> bool:
        match = req.headers.get("If-Match")
        if match is not None and match.strip() != "*" and (etag is None or match.strip() != etag):
            return False
        since = req.headers.get("If-Unmodified-Since")
        if since is not None and modified is not None:
            return parsedate_to_datetime(modified) <= parsedate_to_datetime(since)
        return True

    def _if_range_holds(
        self, req: BaseHTTPRequestHandler, name: str, etag: str | None, modified: str | None
    ) -> bool:
        value = req.headers.get("If-Range")
        if value is None or not self.meta[name].if_range:
            return True
        value = value.strip()
        if value.startswith(('"', "W/")):
            return etag is not None and value == etag  # strong comparison
        return modified is not None and value == modified

    def _send(self, req: BaseHTTPRequestHandler, name: str, body: memoryview) -> None:
        chunk = 64 * 1024
        for offset in range(0, len(body), chunk):
            piece = body[offset : offset + chunk]
            try:
                req.wfile.write(piece)
            except OSError:
                return
            with self.lock:
                self.served[name] += len(piece)
            rate = self.rate
            if rate:
                time.sleep(len(piece) / rate)
