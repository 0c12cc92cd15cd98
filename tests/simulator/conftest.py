"""Small policies and traces for simulator tests: minutes of load, seconds to run."""

from __future__ import annotations

import random
from typing import Any

from decisions.endpoints import ManagedEndpoint
from decisions.policy import Policy
from simulator import SimSettings, Trace


def policy(**spillover: Any) -> Policy:
    """One 8B deployment on single L40S replicas, spilling to every cloud unless told."""
    spill: dict[str, Any] = {
        "enabled": True,
        "providers": ["aws", "gcp", "azure"],
        "max_spilled_replicas": 4,
        "scale_up_window_s": 30,
        "cool_down_s": 120,
    }
    spill.update(spillover)
    return Policy.model_validate(
        {
            "credentials": {
                "aws": {"profile": "p"},
                "gcp": {"file": "/k.json"},
                "azure": {"env": ["AZURE_CLIENT_ID"]},
            },
            "deployments": {
                "chat": {
                    "model": "llama-3.1-8b",
                    "weights": "s3://models/llama/",
                    "runtime": "simulated",
                    "sku": "L40S",
                    "gpus": 1,
                    "pools": ["reserved-a"],
                    "min_replicas": 1,
                    "max_replicas": 8,
                    "autoscaling": {"signal": "running_per_replica", "target": 16},
                    "spillover": spill,
                    # Reserved first means rented replicas take traffic only once the reserved
                    # ones count as full: at a cap that still holds the TTFT target.
                    "gateway": {"max_concurrency_per_replica": 24},
                }
            },
        }
    )


def with_managed(p: Policy, name: str = "chat", **fields: Any) -> Policy:
    """``p`` with one managed endpoint for ``name`` (a hosted 8B price; the us group)."""
    endpoint: dict[str, Any] = {
        "name": "hosted",
        "base_url": "https://llm.example.com/v1",
        "residency_group": "us",
        "usd_per_million_input_tokens": 0.18,
        "usd_per_million_output_tokens": 0.18,
        "max_concurrency": 32,
        "added_latency_s": 0.3,
    }
    endpoint.update(fields)
    dep = p.deployments[name].model_copy(
        update={"managed": [ManagedEndpoint.model_validate(endpoint)]}
    )
    return p.model_copy(update={"deployments": {**p.deployments, name: dep}})


def with_gateway(p: Policy, name: str = "chat", **fields: Any) -> Policy:
    """``p`` with these gateway settings for ``name``."""
    dep = p.deployments[name]
    gateway = dep.gateway.model_copy(update=fields)
    dep = dep.model_copy(update={"gateway": gateway})
    return p.model_copy(update={"deployments": {**p.deployments, name: dep}})


def bursty_trace(seed: int = 1, minutes: int = 30, quiet: float = 1.5, busy: float = 5.0) -> Trace:
    """Quiet for the first and last third, busy in the middle; prompt and output sizes vary."""
    rng = random.Random(seed)
    rows: list[tuple[float, int, int]] = []
    now = 0.0
    end = minutes * 60.0
    while True:
        third = now / end * 3
        rate = busy if 1 <= third < 2 else quiet
        now += rng.expovariate(rate)
        if now >= end:
            break
        rows.append((now, rng.randint(200, 2000), rng.randint(20, 400)))
    return Trace.of(rows, duration_s=end, source="synthetic")


def settings(**fields: Any) -> SimSettings:
    base: dict[str, Any] = {
        "seed": 3,
        "probe_requests": 3000,
        "reserved": {"machines": 2},
        "on_demand": {"upscale_delay_s": 60, "downscale_delay_s": 300, "tune": False},
    }
    base.update(fields)
    return SimSettings.model_validate(base)
