"""Spill out and back, end to end.

A reserved agent runs the deployment's only replica on all its GPUs. Load saturates it; the
deployment workflow rents the cheapest H100 machine inside ``eu`` through the AWS adapter (a real
moto server), the stand-in agent for that machine registers, the weights are prefetched from S3
(moto again) onto it, and the new replica serves. When the load stops, the spilled replica is
drained and its machine terminated, and the reserved replica is kept.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import boto3

from providers.catalog import default_catalog
from tests.conftest import eventually
from tests.workflows.conftest import ControlPlaneHarness, ec2_instances, eventually_async

RUNTIME_ARGS = ["--max-running-requests", "2"]


WEIGHT_BYTES = 1 << 20


def safetensors(size: int) -> bytes:
    """A valid safetensors file with one U8 tensor of ``size`` bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(range(256)) * (size // 256)


def upload_weights(moto_server: str, bucket: str) -> str:
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="chat/config.json", Body=b'{"architectures": ["Chat"]}')
    s3.put_object(Bucket=bucket, Key="chat/model.safetensors", Body=safetensors(WEIGHT_BYTES))
    return f"s3://{bucket}/chat/"


def spill_policy(name: str, pool: str, weights: str, **spillover: Any) -> dict[str, Any]:
    return {
        "credentials": {"aws": {"env": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]}},
        "deployments": {
            name: {
                "model": "chat",
                "weights": weights,
                "runtime": "simulated",
                "runtime_args": RUNTIME_ARGS,
                "sku": "H100-80GB",
                "gpus": 8,
                "pools": [pool],
                "min_replicas": 1,
                "max_replicas": 2,
                "autoscaling": {
                    "signal": "queued_per_replica",
                    "target": 2,
                    "scale_down_below": 0.5,
                    "max_step_up": 1,
                },
                "spillover": {
                    "enabled": True,
                    "providers": ["aws"],
                    "residency": "eu",
                    "max_spilled_replicas": 1,
                    "scale_up_window_s": 1,
                    "cool_down_s": 4,
                    **spillover,
                },
            }
        },
    }


async def start_saturated_reserved(
    control: ControlPlaneHarness, tmp_path: Path, moto_server: str, policy: dict[str, Any]
) -> tuple[str, Any]:
    name = next(iter(policy["deployments"]))
    control.write_policy(policy)
    host = await control.start(moto_server=moto_server, weights_endpoint_url=moto_server)
    seed = tmp_path / "seed-model"
    seed.mkdir()
    control.start_agent(
        f"reserved-{control.suffix}",
        pool=policy["deployments"][name]["pools"][0],
        gpus=8,
        replicas=[
            {
                "replica_id": f"{name}-seed",
                "deployment": name,
                "model_path": str(seed),
                "gpus": list(range(8)),
                "extra_args": RUNTIME_ARGS,
            }
        ],
    )
    await eventually(lambda: len(control.replicas(name)) == 1, within_s=30, interval=0.1)
    return name, host


async def test_spill_out_to_aws_inside_the_lock_and_back(
    control: ControlPlaneHarness, tmp_path: Path, moto_server: str, aws_credentials: None
) -> None:
    weights = upload_weights(moto_server, f"weights-{uuid.uuid4().hex[:8]}")
    pool = f"reserved-{control.suffix}"
    policy = spill_policy(control.name("chat"), pool, weights)
    name, host = await start_saturated_reserved(control, tmp_path, moto_server, policy)
    load = control.load(name, per_replica=10)
    load.start()

    # Out: a second replica, on a rented machine inside `eu`.
    await eventually(lambda: len(control.replicas(name)) == 2, within_s=90, interval=0.1)
    agents = {a for a, _ in control.replicas(name)}
    rented = next(a for a in agents if a != f"reserved-{control.suffix}")
    assert control.scheduler is not None
    record = control.scheduler.fleet.get(rented)
    assert record is not None
    labels = record.registration.labels
    assert labels.provider == "aws"
    assert default_catalog().region("aws", labels.region).residency == "eu"
    assert labels.extra["instance_type"] == "p5.48xlarge"
    key = labels.extra["spillway-key"]
    assert key.startswith(f"provision-{name}-")
    machines = ec2_instances(moto_server, labels.region, f"provision-{name}-")
    assert [m["key"] for m in machines] == [key]
    assert machines[0]["InstanceType"] == "p5.48xlarge"
    # The weights came from S3 onto the node before the replica started.
    weights_dir = tmp_path / "weights" / name
    fetched = list(weights_dir.rglob("model.safetensors"))
    assert len(fetched) == 1 and fetched[0].read_bytes() == safetensors(WEIGHT_BYTES)
    recent: list[str] = []

    async def served() -> bool:
        recent[:] = (await host.status(name)).recent
        return any("serving on aws p5.48xlarge" in line for line in recent)

    await eventually_async(served, within_s=20)
    assert any("cheapest allowed offer inside residency group 'eu'" in r for r in recent)

    # Back: the load stops, the spilled replica is drained and its machine given back.
    await load.stop()
    await eventually(
        lambda: ec2_instances(moto_server, labels.region, f"provision-{name}-") == [],
        within_s=60,
        interval=0.2,
    )
    await eventually(
        lambda: [r for _, r in control.replicas(name)] == [f"{name}-seed"], within_s=30
    )

    async def released() -> bool:
        status = await host.status(name)
        return status.releasing == [] and any(
            "released" in line and "machine terminated" in line for line in status.recent
        )

    await eventually_async(released, within_s=20)
    assert (await host.status(name)).pending == []
    await asyncio.sleep(2)
    assert [r for _, r in control.replicas(name)] == [f"{name}-seed"]
    # Released once: the stopped agent lingering in the fleet is not released again.
    recent = (await host.status(name)).recent
    assert sum(line.split(" ", 1)[1].startswith("releasing ") for line in recent) == 1, recent
