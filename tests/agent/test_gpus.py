"""GPU discovery: the static inventory, the fallback when NVML is absent, and NVML parsing."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import pytest

from agent.config import GpuDiscovery
from agent.gpus import GpuDiscoveryError, NvmlInventory, StaticInventory, discover


def _nvml_works() -> bool:
    if importlib.util.find_spec("pynvml") is None:
        return False
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


STATIC = GpuDiscovery.model_validate(
    {
        "discovery": "auto",
        "static": [
            {"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": 2},
            {"model": "NVIDIA L4", "memory_gib": 24},
        ],
    }
)


def test_static_inventory_numbers_gpus_across_entries() -> None:
    inventory = StaticInventory.from_config(STATIC, "node-a")
    assert [(g.index, g.model, g.memory_total_bytes) for g in inventory.gpus] == [
        (0, "NVIDIA H100 80GB HBM3", 80 << 30),
        (1, "NVIDIA H100 80GB HBM3", 80 << 30),
        (2, "NVIDIA L4", 24 << 30),
    ]
    assert len({g.uuid for g in inventory.gpus}) == 3
    assert [s.healthy for s in inventory.sample()] == [True] * 3


@pytest.mark.skipif(_nvml_works(), reason="this machine has an NVIDIA driver")
def test_auto_falls_back_to_static_without_a_driver() -> None:
    inventory = discover(STATIC, "node-a")
    assert inventory.source == "static"
    assert len(inventory.gpus) == 3


@pytest.mark.skipif(_nvml_works(), reason="this machine has an NVIDIA driver")
def test_nvml_mode_fails_clearly_without_a_driver() -> None:
    with pytest.raises(GpuDiscoveryError, match="NVML is not usable on this machine"):
        discover(GpuDiscovery(discovery="nvml"), "node-a")


@pytest.mark.skipif(not _nvml_works(), reason="needs an NVIDIA driver and GPU")
def test_nvml_discovers_real_gpus() -> None:
    inventory = discover(GpuDiscovery(discovery="nvml"), "node-a")
    try:
        assert inventory.source == "nvml"
        assert inventory.gpus, "NVML initialised but listed no GPUs"
        for gpu in inventory.gpus:
            assert gpu.uuid.startswith("GPU-")
            assert gpu.memory_total_bytes > 1 << 30
        samples = inventory.sample()
        assert [s.index for s in samples] == [g.index for g in inventory.gpus]
        assert all(0.0 <= s.utilization <= 1.0 for s in samples)
    finally:
        inventory.close()


class FakeNvml:
    """The slice of the pynvml API the inventory uses, over a table of devices."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[dict[str, Any]]) -> None:
        self.devices = devices
        self.shutdowns = 0

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return str(self.devices[handle]["uuid"])

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return str(self.devices[handle]["name"]).encode()  # older bindings return bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        device = self.devices[handle]
        if device.get("lost"):
            raise self.NVMLError("GPU is lost")
        return SimpleNamespace(total=device["total"], used=device["used"], free=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self.devices[handle]["util"], memory=0)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1


def test_nvml_inventory_maps_devices_and_marks_lost_gpus_unhealthy() -> None:
    fake = FakeNvml(
        [
            {
                "uuid": "GPU-aaa",
                "name": "NVIDIA H100 80GB HBM3",
                "total": 85_520_809_984,
                "used": 1 << 30,
                "util": 37,
            },
            {
                "uuid": "GPU-bbb",
                "name": "NVIDIA H100 80GB HBM3",
                "total": 85_520_809_984,
                "used": 0,
                "util": 0,
            },
        ]
    )
    inventory = NvmlInventory(fake)
    assert [(g.index, g.uuid, g.model) for g in inventory.gpus] == [
        (0, "GPU-aaa", "NVIDIA H100 80GB HBM3"),
        (1, "GPU-bbb", "NVIDIA H100 80GB HBM3"),
    ]
    first = inventory.sample()
    assert (first[0].memory_used_bytes, first[0].utilization, first[0].healthy) == (
        1 << 30,
        0.37,
        True,
    )
    fake.devices[1]["lost"] = True
    second = inventory.sample()
    assert [s.healthy for s in second] == [True, False]
    inventory.close()
    assert fake.shutdowns == 1
