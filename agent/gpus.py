"""GPU discovery: NVML when the NVIDIA driver is present, a static inventory otherwise.

The inventory (which GPUs exist) is read once at start-up; ``sample()`` reads their live state
for every report. This module knows nothing about replicas: which GPU belongs to which replica
is the supervisor's bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import GpuDiscovery

log = logging.getLogger(__name__)
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    uuid: str
    model: str
    memory_total_bytes: int


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    memory_used_bytes: int
    utilization: float  # 0..1
    healthy: bool


class GpuInventory(Protocol):
    source: str  # "nvml" or "static"
    gpus: Sequence[GpuInfo]

    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


class GpuDiscoveryError(Exception):
    """NVML was required but could not be used."""


class StaticInventory:
    """GPUs declared in the config file. Samples report them idle and healthy."""

    source = "static"
    gpus: Sequence[GpuInfo]

    def __init__(self, gpus: Sequence[GpuInfo]) -> None:
        self.gpus = list(gpus)

    @classmethod
    def from_config(cls, config: GpuDiscovery, agent_id: str) -> StaticInventory:
        gpus: list[GpuInfo] = []
        for entry in config.static:
            for _ in range(entry.count):
                index = len(gpus)
                gpus.append(
                    GpuInfo(
                        index=index,
                        uuid=f"static-{agent_id}-{index}",
                        model=entry.model,
                        memory_total_bytes=int(entry.memory_gib * GIB),
                    )
                )
        return cls(gpus)

    def sample(self) -> list[GpuSample]:
        return [GpuSample(g.index, 0, 0.0, True) for g in self.gpus]

    def close(self) -> None:
        return None


class NvmlInventory:
    """GPUs as the NVIDIA driver reports them, through NVML (the ``nvidia-ml-py`` binding)."""

    source = "nvml"
    gpus: Sequence[GpuInfo]

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handles: list[Any] = []
        gpus: list[GpuInfo] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            self._handles.append(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    model=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                )
            )
        self.gpus = gpus

    @classmethod
    def open(cls) -> NvmlInventory:
        """Initialise NVML; raises :class:`GpuDiscoveryError` when the driver is unusable."""
        try:
            import pynvml
        except ImportError as exc:  # the agent extra installs it; be clear if it is missing
            raise GpuDiscoveryError("the nvidia-ml-py package is not installed") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuDiscoveryError(f"NVML is not usable on this machine: {exc}") from exc
        try:
            return cls(pynvml)
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise GpuDiscoveryError(f"NVML failed while listing GPUs: {exc}") from exc

    def sample(self) -> list[GpuSample]:
        samples = []
        for gpu, handle in zip(self.gpus, self._handles, strict=True):
            try:
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                samples.append(GpuSample(gpu.index, int(memory.used), rates.gpu / 100.0, True))
            except self._nvml.NVMLError as exc:
                # A GPU that fell off the bus or hit an Xid error stops answering: report it
                # unhealthy instead of failing the whole report.
                log.warning("GPU %d (%s) did not answer NVML: %s", gpu.index, gpu.uuid, exc)
                samples.append(GpuSample(gpu.index, 0, 0.0, False))
        return samples

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def discover(config: GpuDiscovery, agent_id: str) -> GpuInventory:
    """Find this machine's GPUs as the config asks (``auto``, ``nvml`` or ``static``)."""
    if config.discovery == "static":
        return StaticInventory.from_config(config, agent_id)
    try:
        inventory = NvmlInventory.open()
    except GpuDiscoveryError as exc:
        if config.discovery == "nvml":
            raise
        log.info("%s; using the static GPU inventory (%d GPUs)", exc, _static_count(config))
        return StaticInventory.from_config(config, agent_id)
    if not inventory.gpus and config.static:
        log.info("NVML found no GPUs; using the static GPU inventory")
        inventory.close()
        return StaticInventory.from_config(config, agent_id)
    return inventory


def _static_count(config: GpuDiscovery) -> int:
    return sum(entry.count for entry in config.static)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
