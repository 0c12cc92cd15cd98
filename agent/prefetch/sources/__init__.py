"""Sources turn a URI into the objects to fetch, each with a URL that accepts ``Range``.

``resolve`` picks the source from the scheme: ``s3://``, ``gs://``, ``az://``, ``http(s)://``;
``list_source`` also tells whether the URI named one object (rather than a prefix or a file
list), which decides how the destination is read (``agent.prefetch.destination``).
Store SDKs are imported only by the source that needs them, so a node with just the ``agent``
extra can fetch over plain HTTP(S). Sources list and sign; they never download object bodies.
"""

from __future__ import annotations

from agent.prefetch.errors import InvalidSourceError
from agent.prefetch.model import RemoteObject
from agent.prefetch.sources.base import Listing, SourceOptions

__all__ = ["Listing", "SourceOptions", "list_source", "resolve"]


def resolve(uri: str, options: SourceOptions | None = None) -> list[RemoteObject]:
    """The objects under ``uri`` (a prefix, a single object, or an HTTP base with a file list)."""
    return list_source(uri, options).objects


def list_source(uri: str, options: SourceOptions | None = None) -> Listing:
    """``resolve``, and whether ``uri`` named a single object."""
    options = options or SourceOptions()
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        from agent.prefetch.sources.http import resolve_http

        listing = resolve_http(uri, options)
    elif scheme == "s3":
        from agent.prefetch.sources.s3 import resolve_s3

        listing = resolve_s3(uri, options)
    elif scheme in ("gs", "gcs"):
        from agent.prefetch.sources.gcs import resolve_gcs

        listing = resolve_gcs(uri, options)
    elif scheme in ("az", "azure"):
        from agent.prefetch.sources.azure import resolve_azure

        listing = resolve_azure(uri, options)
    else:
        raise InvalidSourceError(
            f"{uri!r}: expected s3://, gs://, az://, http:// or https:// followed by a path"
        )
    listing.objects.sort(key=lambda o: (o.size, o.path))
    return listing
