"""Weight prefetch: pull a model directory from S3, GCS, Azure Blob or HTTP(S) onto a node with
many parallel byte ranges, verify every file and resume after a crash.

``prefetch()`` is the one call the CLI and the Temporal activity use. Nothing here imports a
store SDK or Temporal at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.prefetch.engine import Engine, Progress
from agent.prefetch.errors import (
    AuthError,
    DiskFullError,
    InvalidSourceError,
    NotFoundError,
    PrefetchError,
    TransferError,
    VerificationError,
)
from agent.prefetch.model import FileResult, PrefetchResult, RemoteObject, Tuning
from agent.prefetch.sources import SourceOptions, resolve

__all__ = [
    "AuthError",
    "DiskFullError",
    "Engine",
    "FileResult",
    "InvalidSourceError",
    "NotFoundError",
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
    dest: Path,
    options: SourceOptions | None = None,
    tuning: Tuning | None = None,
    resume: Any = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_state: Callable[[dict[str, Any]], None] | None = None,
    engine_ready: Callable[[Engine], None] | None = None,
) -> PrefetchResult:
    """Resolve ``source`` and download it into ``dest``; blocking. Raises ``PrefetchError``."""
    objects = resolve(source, options)
    engine = Engine(
        objects,
        dest,
        tuning=tuning,
        resume=resume,
        on_progress=on_progress,
        on_state=on_state,
        source=source,
    )
    if engine_ready is not None:
        engine_ready(engine)
    return engine.run()
