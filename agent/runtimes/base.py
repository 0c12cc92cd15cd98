"""What a runtime is: how to launch an inference server and how to read its HTTP API.

A runtime turns a :class:`LaunchSpec` into a command line and environment, and reads health,
load and server info from a running server. Both runtimes (``sglang`` and ``simulated``) speak
SGLang's HTTP API, so the readers live here. The server's cap on running requests
(``max_running_requests``) is taken from ``/v1/loads`` or ``/metrics`` when they carry it, else
read from ``/server_info`` once per :class:`ServerClient` (the supervisor makes one per launch).
This module starts no process and keeps no state: the supervisor does that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx

from agent.status import ReplicaLoad


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything a runtime needs to build one replica's command line."""

    model_path: Path
    served_model_name: str
    host: str
    port: int
    gpu_indices: tuple[int, ...]
    gpu_model: str = ""
    mem_fraction_static: float | None = None
    extra_args: tuple[str, ...] = ()
    #: SGLang's --api-key: requests must carry it as a bearer token.
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    detail: str = ""


class Runtime(Protocol):
    """An inference server kind. Implementations must be cheap to build and side-effect free."""

    @property
    def name(self) -> str: ...

    def command(self, spec: LaunchSpec) -> list[str]: ...

    def environment(self, spec: LaunchSpec, base: Mapping[str, str]) -> dict[str, str]: ...


def launch_server_args(spec: LaunchSpec, tp_size: int, extra: Sequence[str] = ()) -> list[str]:
    """The arguments of SGLang's ``launch_server`` for ``spec``; ``extra`` goes before the
    memory fraction and the deployment's own arguments."""
    args = [
        "--model-path",
        str(spec.model_path),
        "--served-model-name",
        spec.served_model_name,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--tp-size",
        str(tp_size),
        "--enable-metrics",
        *extra,
    ]
    if spec.mem_fraction_static is not None:
        args += ["--mem-fraction-static", f"{spec.mem_fraction_static:g}"]
    if spec.api_key is not None:
        args += ["--api-key", spec.api_key]
    return args + list(spec.extra_args)


def gpu_environment(spec: LaunchSpec, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the replica pinned to its GPUs (and only those) by CUDA_VISIBLE_DEVICES."""
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in spec.gpu_indices)
    return env


@dataclass
class ServerClient:
    """Reads one replica's SGLang HTTP API. Every method returns instead of raising."""

    base_url: str
    timeout_s: float = 2.0
    _client: httpx.AsyncClient = field(init=False)
    #: From ``/server_info``: None until read; 0 when the server does not say.
    _max_running: int | None = field(default=None, init=False)
    _info_tries: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s)

    async def close(self) -> None:
        await self._client.aclose()

    async def health(self) -> Health:
        """``/health``: 200 means serving; 503 (starting, shutting down) or no answer does not."""
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError as exc:
            return Health(False, f"/health: {type(exc).__name__}: {exc}".rstrip(": "))
        if response.status_code == 200:
            return Health(True)
        return Health(False, f"/health answered {response.status_code}")

    async def load(self) -> ReplicaLoad | None:
        """Load from ``/v1/loads`` (summed over data-parallel ranks), else from ``/metrics``;
        ``max_running_requests`` from ``/server_info`` when neither carries it."""
        try:
            response = await self._client.get("/v1/loads")
            if response.status_code == 200:
                load = parse_loads(response.json())
            else:
                response = await self._client.get("/metrics")
                if response.status_code != 200:
                    return None
                load = parse_metrics(response.text)
        except (httpx.HTTPError, ValueError):
            return None
        if load.max_running_requests:
            return load
        cap = await self.max_running_requests()
        return replace(load, max_running_requests=cap) if cap else load

    async def max_running_requests(self) -> int:
        """The server's cap on running requests from ``/server_info``, read once (a few tries
        while the server does not answer); 0 when it does not say."""
        if self._max_running is None and self._info_tries < INFO_TRIES:
            self._info_tries += 1
            info = await self.server_info()
            if info is not None:
                self._max_running = parse_max_running(info)
        return self._max_running or 0

    async def server_info(self) -> dict[str, Any] | None:
        for path in ("/server_info", "/get_server_info"):
            try:
                response = await self._client.get(path)
            except httpx.HTTPError:
                return None
            if response.status_code == 200:
                info = response.json()
                return info if isinstance(info, dict) else None
        return None


#: Times a client asks ``/server_info`` for the running-request cap before it gives up.
INFO_TRIES = 3


def parse_max_running(info: Mapping[str, Any]) -> int:
    """``max_running_requests`` of SGLang's ``/server_info``: the top-level server argument
    when set, else the sum over the ranks' ``internal_states``; 0 when it is not there."""
    top = _number(info.get("max_running_requests"))
    if top >= 1:
        return int(top)
    states = info.get("internal_states")
    if isinstance(states, list):
        return int(
            sum(_number(s.get("max_running_requests")) for s in states if isinstance(s, dict))
        )
    return 0


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def parse_loads(body: Any) -> ReplicaLoad:
    """SGLang's ``/v1/loads``: ``{"loads": [{"num_running_reqs": .., ...}, ...]}``."""
    ranks = body.get("loads") if isinstance(body, dict) else None
    if not isinstance(ranks, list):
        raise ValueError("/v1/loads: expected a 'loads' list")
    ranks = [r for r in ranks if isinstance(r, dict)]
    if not ranks:
        return ReplicaLoad()
    return ReplicaLoad(
        running_requests=int(sum(_number(r.get("num_running_reqs")) for r in ranks)),
        queued_requests=int(sum(_number(r.get("num_waiting_reqs")) for r in ranks)),
        kv_cache_usage=_clamp(sum(_number(r.get("token_usage")) for r in ranks) / len(ranks)),
        generation_tokens_per_second=sum(_number(r.get("gen_throughput")) for r in ranks),
        cache_hit_rate=_clamp(sum(_number(r.get("cache_hit_rate")) for r in ranks) / len(ranks)),
        max_running_requests=int(sum(_number(r.get("max_running_requests")) for r in ranks)),
    )


def parse_metrics(text: str) -> ReplicaLoad:
    """The load gauges of SGLang's Prometheus text (``sglang:num_running_reqs`` and friends)."""
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith("sglang:"):
            continue
        name_part, _, number = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            values.setdefault(name, []).append(float(number))
        except ValueError:
            continue

    def total(name: str) -> float:
        return sum(v for v in values.get(f"sglang:{name}", []) if math.isfinite(v))

    def mean(name: str) -> float:
        found = values.get(f"sglang:{name}", [])
        return total(name) / len(found) if found else 0.0

    return ReplicaLoad(
        running_requests=int(total("num_running_reqs")),
        queued_requests=int(total("num_queue_reqs")),
        kv_cache_usage=_clamp(mean("token_usage")),
        generation_tokens_per_second=total("gen_throughput"),
        cache_hit_rate=_clamp(mean("cache_hit_rate")),
        max_running_requests=int(total("max_running_requests")),
    )


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))
