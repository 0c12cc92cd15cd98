"""What every source shares: how to reach the store, what a listing returns, and parsing of
bucket URIs.

Each source module (``s3``, ``gcs``, ``azure``, ``http``) imports this one, never the package
that picks among them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.prefetch.errors import InvalidSourceError
from agent.prefetch.model import RemoteObject

SIGNED_URL_EXPIRY_S = 6 * 3600


@dataclass
class SourceOptions:
    """How to reach the store. Empty fields fall back to the SDK's usual environment variables."""

    files: list[str] = field(default_factory=list)
    endpoint_url: str | None = None
    azure_connection_string: str | None = None
    expires_s: int = SIGNED_URL_EXPIRY_S


@dataclass
class Listing:
    """What a URI resolved to. ``single``: the URI named one object itself (a key, a blob, a
    file URL), not a prefix, nor a base URL with a file list that happens to hold one file."""

    objects: list[RemoteObject]
    single: bool = False


def split_bucket(uri: str) -> tuple[str, str]:
    """``scheme://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    rest = uri.split("://", 1)[1]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidSourceError(f"{uri!r}: no bucket or container name")
    return bucket, prefix


def relative_key(key: str, prefix: str) -> str:
    """The path of ``key`` below ``prefix``; a prefix naming one object gives its base name."""
    if key == prefix:
        return key.rsplit("/", 1)[-1]
    base = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    return key[len(base) :] if key.startswith(base) else key


def require(module: str, extra: str) -> None:
    raise InvalidSourceError(
        f"the {module} package is needed for this source; install it with "
        f"pip install 'spillway[{extra}]' or pip install {module}"
    )
