"""Filling free reserved GPUs first: a saturated deployment grows onto its own pool's free GPUs
through a provision workflow, without renting anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import eventually
from tests.workflows.conftest import ControlPlaneHarness, eventually_async

RUNTIME_ARGS = ["--max-running-requests", "2"]


def policy(name: str, pool: str, weights: Path, **spillover: Any) -> dict[str, Any]:
    return {
        "deployments": {
            name: {
                "model": "chat",
                "weights": str(weights),
                "runtime": "simulated",
                "runtime_args": RUNTIME_ARGS,
                "sku": "H100-80GB",
                "gpus": 1,
                "pools": [pool],
                "min_replicas": 1,
                "max_replicas": 3,
                "autoscaling": {
                    "signal": "queued_per_replica",
                    "target": 2,
                    "scale_down_below": 0.5,
                    "max_step_up": 1,
                },
                "spillover": {"enabled": False, "scale_up_window_s": 1, "cool_down_s": 3},
            }
        }
    }


async def test_saturation_fills_free_reserved_gpus_first(
    control: ControlPlaneHarness, tmp_path: Path
) -> None:
    name = control.name("chat")
    pool = f"reserved-{control.suffix}"
    weights = tmp_path / "model"
    weights.mkdir()
    control.write_policy(policy(name, pool, weights))
    host = await control.start()
    control.start_agent(
        "node-r1",
        pool=pool,
        gpus=2,
        replicas=[
            {
                "replica_id": f"{name}-seed",
                "deployment": name,
                "model_path": str(weights),
                "gpus": [0],
                "extra_args": RUNTIME_ARGS,
            }
        ],
    )
    await eventually(lambda: len(control.replicas(name)) == 1, within_s=30, interval=0.1)
    load = control.load(name, per_replica=12)
    load.start()
    await eventually(lambda: len(control.replicas(name)) == 2, within_s=40, interval=0.1)
    replicas = control.replicas(name)
    assert {agent for agent, _ in replicas} == {"node-r1"}
    recent: list[str] = []

    async def reported() -> bool:
        recent[:] = (await host.status(name)).recent
        return any("serving on reserved agent node-r1" in line for line in recent)

    await eventually_async(reported, within_s=20)
    assert any("free reserved GPUs" in line for line in recent), recent
    assert (await host.status(name)).pending == []
