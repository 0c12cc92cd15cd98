"""The policy store: an invalid edit never replaces the policy in force, a valid one does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.configfile import ConfigError
from decisions.policy import Policy
from scheduler.policystore import PolicyStore
from tests.conftest import SchedulerFactory, write_yaml


def policy(max_replicas: int = 4) -> dict[str, Any]:
    return {
        "deployments": {
            "chat": {
                "model": "chat",
                "weights": "/models/chat",
                "sku": "H100-80GB",
                "gpus": 8,
                "pools": ["reserved"],
                "max_replicas": max_replicas,
                "autoscaling": {"target": 4},
            }
        }
    }


def test_a_broken_edit_keeps_the_old_policy_and_says_why(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "policy.yaml", policy(4))
    changes: list[tuple[Policy, str]] = []
    store = PolicyStore(path, on_change=lambda p, d: changes.append((p, d)))
    store.load()
    first = store.digest
    assert store.policy.deployments["chat"].max_replicas == 4

    bad = policy(4)
    bad["deployments"]["chat"]["gpus"] = "eight"
    bad["deployments"]["chat"]["max_replicas"] = 0
    write_yaml(path, bad)
    assert store.reload() is False
    assert store.policy.deployments["chat"].max_replicas == 4
    assert store.digest == first
    assert store.rejected_total == 1
    text = "\n".join(store.errors)
    assert "policy.yaml:" in text and "deployments.chat.gpus" in text
    assert "deployments.chat.max_replicas" in text
    # The same broken content is not refused (and logged) again on every poll.
    assert store.reload() is False and store.rejected_total == 1
    assert changes == []

    write_yaml(path, policy(6))
    assert store.reload() is True
    assert store.policy.deployments["chat"].max_replicas == 6
    assert store.errors == []
    assert store.digest != first
    assert [d for _, d in changes] == [store.digest]
    # Unchanged content: nothing happens.
    assert store.reload() is False and len(changes) == 1


def test_a_missing_file_keeps_the_policy_and_an_invalid_start_is_refused(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "policy.yaml", policy())
    store = PolicyStore(path)
    store.load()
    path.unlink()
    assert store.reload() is False
    assert store.policy.deployments["chat"].max_replicas == 4
    assert "cannot read" in store.errors[0]

    broken = write_yaml(tmp_path / "broken.yaml", {"deployments": {"chat": {"model": "x"}}})
    with pytest.raises(ConfigError) as info:
        PolicyStore(broken).load()
    assert "broken.yaml:" in str(info.value)
    with pytest.raises(RuntimeError, match="not been loaded"):
        _ = PolicyStore(broken).policy


async def test_the_policy_in_force_and_refused_edits_are_metrics(
    start_scheduler: SchedulerFactory, tmp_path: Path
) -> None:
    import httpx

    path = write_yaml(tmp_path / "policy.yaml", policy(4))
    store = PolicyStore(path)
    store.load()
    scheduler = await start_scheduler(metrics_listen="127.0.0.1:0")
    scheduler.service.policy_store = store

    async def metrics() -> list[str]:
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{scheduler.metrics_port}/metrics"
            return (await client.get(url)).text.splitlines()

    lines = await metrics()
    assert f'spillway_policy{{digest="{store.digest}"}} 1.0' in lines
    assert "spillway_policy_edit_refused 0.0" in lines
    path.write_text("deployments: [not, a, mapping]\n")
    assert store.reload() is False
    lines = await metrics()
    assert "spillway_policy_edit_refused 1.0" in lines
    assert "spillway_policy_refused_edits_total 1.0" in lines
