"""The ``prefetch_weights`` Temporal activity: the prefetch engine on the agent's task queue.

It heartbeats the completed byte ranges, so when Temporal retries an attempt (the agent
restarted, a range kept failing) the next attempt resumes from ``activity.info().
heartbeat_details`` instead of fetching everything again. Failures that a retry cannot fix
(not found, access denied, verification, disk full, a bad source or a file where the destination
directory must be) are raised as non-retryable application errors whose ``type`` is the error
class name; an object that kept changing at the origin (``OriginChangedError``) is retryable,
since the next attempt lists it anew. The destination is always a directory here.

The node worker registers this function; this module does not start workers or clients.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from agent.prefetch import Engine, PrefetchError, SourceOptions, Tuning, prefetch
from agent.prefetch.state import MANIFEST, STATE_DIR, covered, parse_ranges

HEARTBEAT_EVERY_S = 1.0


@dataclass
class PrefetchWeightsInput:
    source: str
    destination: str
    files: list[str] = field(default_factory=list)
    endpoint_url: str | None = None
    connections: int | None = None
    range_size: int | None = None
    retries: int = 6
    fsync: bool = True


@dataclass
class PrefetchWeightsOutput:
    destination: str
    manifest: str
    files: int
    total_bytes: int
    fetched_bytes: int
    resumed_bytes: int
    seconds: float
    attempt: int
    resumed_from_heartbeat: bool


def _resume_details() -> Any:
    details = activity.info().heartbeat_details
    return details[0] if details else None


@activity.defn(name="prefetch_weights")
async def prefetch_weights(params: PrefetchWeightsInput) -> PrefetchWeightsOutput:
    info = activity.info()
    resume = _resume_details()
    resumed = sum(covered(r) for _, r in parse_ranges(resume).values()) > 0
    latest: list[dict[str, Any]] = [resume] if resume else []
    engines: list[Engine] = []
    lock = threading.Lock()

    def on_state(snapshot: dict[str, Any]) -> None:
        with lock:
            latest[:] = [snapshot]

    def heartbeat() -> None:
        with lock:
            details = list(latest)
        activity.heartbeat(*details)

    tuning = Tuning(
        connections=params.connections,
        range_size=params.range_size,
        retries=params.retries,
        fsync=params.fsync,
    )
    options = SourceOptions(files=list(params.files), endpoint_url=params.endpoint_url)
    task = asyncio.ensure_future(
        asyncio.to_thread(
            prefetch,
            params.source,
            Path(params.destination),
            options,
            tuning,
            resume,
            None,
            on_state,
            engines.append,
        )
    )
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_S)
            heartbeat()
            if done:
                break
        result = task.result()
    except asyncio.CancelledError:
        for engine in engines:
            engine.stop()
        await asyncio.gather(task, return_exceptions=True)
        heartbeat()
        raise
    except PrefetchError as exc:
        heartbeat()
        raise ApplicationError(
            str(exc), type=type(exc).__name__, non_retryable=not exc.retryable
        ) from exc
    return PrefetchWeightsOutput(
        destination=result.destination,
        manifest=str(Path(result.destination) / STATE_DIR / MANIFEST),
        files=len(result.files),
        total_bytes=result.total_bytes,
        fetched_bytes=result.fetched_bytes,
        resumed_bytes=result.resumed_bytes,
        seconds=result.seconds,
        attempt=info.attempt,
        resumed_from_heartbeat=resumed,
    )
