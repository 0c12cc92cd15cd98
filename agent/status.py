"""What the agent knows about the replicas it runs, as plain data for the reporter.

The supervisor (which starts and stops inference servers) produces these; the reporter turns
them into capacity reports. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ReplicaState(enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    DRAINING = "draining"
    CRASH_LOOPING = "crash-looping"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    running_requests: int = 0
    queued_requests: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    generation_tokens_per_second: float = 0.0
    cache_hit_rate: float = 0.0  # 0..1
    max_running_requests: int = 0  # the server's own cap; 0: unknown


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    replica_id: str
    deployment: str
    model: str
    runtime: str  # "sglang" or "simulated"
    port: int
    gpu_indices: tuple[int, ...]
    state: ReplicaState
    state_reason: str = ""
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    restarts: int = 0
    started_at: float | None = None  # Unix time
