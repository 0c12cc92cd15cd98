"""The local provider: launch starts a real agent process that registers with a real scheduler."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from providers.base import LaunchRequest
from providers.errors import ResidencyError, UnknownRegionError, UnknownSkuError
from providers.local import LocalProvider
from tests.conftest import SchedulerFactory, Tokens, eventually


def request(key: str, **kwargs: object) -> LaunchRequest:
    fields: dict[str, object] = {
        "key": key,
        "instance_type": "L40S:4",
        "region": "local",
        "image": "local",
        "allowed_regions": frozenset({"local"}),
        "labels": {"deployment": "llama-8b"},
        "user_data": "#cloud-config\n",
    }
    fields.update(kwargs)
    return LaunchRequest(**fields)  # type: ignore[arg-type]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_launch_registers_an_agent_and_terminate_stops_it(
    tmp_path: Path, tokens: Tokens, start_scheduler: SchedulerFactory
) -> None:
    scheduler = await start_scheduler()
    local = LocalProvider(
        tmp_path / "local", f"127.0.0.1:{scheduler.port}", tokens.add, residency="eu"
    )
    try:
        instance = await asyncio.to_thread(local.launch, request("spill-local-1"))
        again = await asyncio.to_thread(local.launch, request("spill-local-1"))
        assert again.instance_id == instance.instance_id
        pid = int(json.loads(next((tmp_path / "local").glob("*.json")).read_text())["pid"])

        def registered() -> object:
            return scheduler.fleet.get(instance.instance_id)

        await eventually(registered, within_s=60, interval=0.1)
        record = scheduler.fleet.get(instance.instance_id)
        assert record is not None
        registration = record.registration
        assert registration.labels.provider == "local"
        assert registration.labels.residency_group == "eu"
        assert [g.model for g in registration.gpus] == ["NVIDIA L40S"] * 4
        assert [i.key for i in local.list_managed()] == ["spill-local-1"]
    finally:
        # Stop the agent even when an assertion above failed: no stray processes.
        await asyncio.to_thread(local.terminate, "spill-local-1")
    await asyncio.to_thread(local.terminate, "spill-local-1")  # a second time: silent
    assert _gone(pid)
    assert local.describe("spill-local-1") is None
    assert local.list_managed() == []


def test_bad_requests_name_what_exists(tmp_path: Path) -> None:
    local = LocalProvider(tmp_path, "127.0.0.1:1", lambda agent_id: "unused")
    with pytest.raises(UnknownSkuError, match=r"unknown SKU 'B200'.*H100-80GB"):
        local.launch(request("bad-1", instance_type="B200:8"))
    with pytest.raises(UnknownRegionError, match="only 'local'"):
        local.launch(request("bad-2", region="mars", allowed_regions=frozenset({"mars"})))
    with pytest.raises(ResidencyError, match="locked to elsewhere"):
        local.launch(request("bad-3", allowed_regions=frozenset({"elsewhere"})))
    assert local.list_managed() == []
    assert list(tmp_path.iterdir()) == []
