"""Free TCP port selection for replicas.

A port is free when this process can bind it on the replica's host. Ports already promised to
replicas are skipped even while their server is still starting (and so not yet bound). This
module never holds a port open: the inference server binds it right after.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Collection


class NoFreePort(Exception):
    """Every port in the range is taken."""


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers bind: connections in TIME_WAIT from an earlier server do not count, a
        # socket listening on the port does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def pick_port(
    host: str, first: int, last: int, taken: Collection[int] = (), start: int | None = None
) -> int:
    """A port in ``first..last`` that is neither in ``taken`` nor bound by anyone: the lowest,
    or with ``start`` the first from there on, wrapping around."""
    span = last - first + 1
    offset = 0 if start is None else (start - first) % span
    for step in range(span):
        port = first + (offset + step) % span
        if port not in taken and port_is_free(host, port):
            return port
    raise NoFreePort(f"no free port in {first}-{last} on {host}")
