"""Weight prefetch: pull a model directory from S3, GCS, Azure Blob or HTTP(S) onto a node with
many parallel byte ranges, verify every file and resume after a crash.

``prefetch()`` is the one call the CLI and the Temporal activity use. Nothing here imports a
store SDK or Temporal at import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from agent.prefetch.destination import place
from agent.prefetch.engine import Engine
from agent.prefetch.errors import (
    AuthError,
    DiskFullError,
    InvalidDestinationError,
    InvalidInputError,
    InvalidSourceError,
    NotFoundError,
    OriginChangedError,
    PrefetchError,
    TransferError,
    VerificationError,
)
from agent.prefetch.model import FileResult, PrefetchResult, Progress, RemoteObject, Tuning
from agent.prefetch.sources import SourceOptions, list_source, resolve

__all__ = [
    "AuthError",
    "DiskFullError",
    "Engine",
    "FileResult",
    "InvalidDestinationError",
    "InvalidInputError",
    "InvalidSourceError",
    "NotFoundError",
    "OriginChangedError",
    "PrefetchError",
    "PrefetchResult",
    "Progress",
    "RemoteObject",
    "SourceOptions",
    "TransferError",
    "Tuning",
    "VerificationError",
    "prefetch",
    "resolve",
]


def prefetch(
    source: str,
    dest: str | os.PathLike[str],
    options: SourceOptions | None = None,
    tuning: Tuning | None = None,
    resume: Any = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_state: Callable[[dict[str, Any]], None] | None = None,
    engine_ready: Callable[[Engine], None] | None = None,
    *,
    copy: bool = False,
) -> PrefetchResult:
    """Resolve ``source`` and download it into ``dest``; blocking. Raises ``PrefetchError``.

    ``dest`` is a directory that receives the objects under their paths. With ``copy`` it is
    read as ``cp`` reads its last argument when ``source`` names one object: an existing
    directory, or a ``dest`` ending in ``/``, receives the file; any other ``dest`` is the file
    itself (see ``agent.prefetch.destination``). An object that changes at the origin during
    the download is listed again and fetched anew (``OriginChangedError`` if it keeps changing).
    """
    listing = list_source(source, options)
    placement = place(dest, listing.single, copy)

    def named(objects: list[RemoteObject]) -> list[RemoteObject]:
        if placement.name is None:
            return objects
        return [replace(o, path=placement.name) for o in objects]

    def relist() -> list[RemoteObject]:
        return named(list_source(source, options).objects)

    engine = Engine(
        named(listing.objects),
        placement.directory,
        tuning=tuning,
        resume=resume,
        on_progress=on_progress,
        on_state=on_state,
        source=source,
        relist=relist,
    )
    if engine_ready is not None:
        engine_ready(engine)
    return engine.run()
