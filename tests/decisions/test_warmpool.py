"""The warm pool's decisions: what a release does, which stopped machine is reused, which go."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.configfile import ConfigError, load_model
from decisions.policy import Policy, WarmPool, resolve_lock
from decisions.warmpool import expired, release_action, reusable, warm_machine
from providers.base import CLAIM_LABEL, DEPLOYMENT_LABEL, WARM_LABEL, Instance, label_safe
from providers.catalog import default_catalog

NOW = 1_764_583_200.0


def policy(name: str = "chat.eu", **spillover: Any) -> Policy:
    return Policy.model_validate(
        {
            "deployments": {
                name: {
                    "model": "chat",
                    "weights": "/models/chat",
                    "sku": "H100-80GB",
                    "gpus": 8,
                    "max_replicas": 4,
                    "autoscaling": {"target": 2},
                    "spillover": {"enabled": True, "residency": "eu", **spillover},
                }
            }
        }
    )


def machine(
    key: str,
    since: float | None,
    *,
    deployment: str = "chat.eu",
    state: str = "stopped",
    cloud: str = "aws",
    instance_type: str = "p5.48xlarge",
    region: str = "eu-north-1",
    claim: str = "",
) -> Instance:
    labels = {DEPLOYMENT_LABEL: label_safe(deployment) if cloud == "gcp" else deployment}
    if since is not None:
        labels[WARM_LABEL] = str(int(since))
    if claim:
        labels[CLAIM_LABEL] = claim
    return Instance(
        key=key,
        cloud=cloud,
        instance_id=f"i-{key}",
        instance_type=instance_type,
        region=region,
        zone="",
        state=state,  # type: ignore[arg-type]
        labels=labels,
    )


def warm(*instances: Instance) -> list[Any]:
    return [w for w in (warm_machine(i) for i in instances) if w is not None]


def test_a_machine_is_warm_only_with_the_label_and_no_claim() -> None:
    assert warm_machine(machine("a", None)) is None
    assert warm_machine(machine("b", NOW, claim="provision-x")) is None
    found = warm_machine(machine("c", NOW, cloud="gcp", instance_type="a3-highgpu-8g"))
    assert found is not None and found.since == NOW and found.deployment == "chat-eu"


@pytest.mark.parametrize(
    ("pool", "cannot_stop", "kept", "why"),
    [
        (None, "", 0, "chat releases with terminate"),
        (WarmPool(), "a one-time spot instance", 0, "it cannot be stopped (a one-time spot"),
        (WarmPool(max_machines=2), "", 2, "the warm pool of chat is full (2 of 2"),
        (WarmPool(max_machines=2), "", 1, ""),
    ],
)
def test_release_action(pool: WarmPool | None, cannot_stop: str, kept: int, why: str) -> None:
    got = release_action(pool, cannot_stop, kept, "chat")
    assert got.startswith(why) and bool(got) == bool(why)


def test_expired_by_age_then_beyond_max_machines_oldest_first() -> None:
    p = policy(release="stop", warm_pool={"max_machines": 2, "max_stopped_s": 600})
    machines = warm(
        machine("old", NOW - 601),
        machine("a", NOW - 10),
        machine("b", NOW - 20),
        machine("c", NOW - 30),
        machine("busy", None, state="running"),
    )
    out = expired(machines, p, NOW)
    assert sorted(out) == ["c", "old"]
    assert "longer than max_stopped_s 600" in out["old"]
    assert "beyond max_machines 2" in out["c"]


def test_every_warm_machine_goes_once_the_policy_keeps_no_pool() -> None:
    machines = warm(machine("a", NOW - 1), machine("x", NOW - 1, deployment="gone"))
    out = expired(machines, policy(), NOW)
    assert "now releases with terminate" in out["a"]
    assert "not in the policy" in out["x"]


def test_reusable_only_inside_the_lock_of_the_sku_stopped_cheapest_first() -> None:
    p = policy(release="stop")
    dep = p.deployments["chat.eu"]
    lock = resolve_lock(p, dep, default_catalog())
    machines = warm(
        machine("us", NOW, region="us-east-1"),  # outside the eu lock
        machine("a100", NOW, instance_type="p4d.24xlarge"),  # another SKU
        machine("stopping", NOW, state="stopping"),
        machine("gcp", NOW - 5, cloud="gcp", instance_type="a3-highgpu-8g", region="europe-west4"),
        machine("aws-old", NOW - 100),
        machine("aws-new", NOW - 1),
    )
    catalog = default_catalog()
    got = [m.key for m in reusable(machines, "chat.eu", dep, lock, catalog, ["aws", "gcp"])]
    prices = {
        "aws": catalog.cloud("aws").instance_types["p5.48xlarge"].prices["eu-north-1"],
        "gcp": catalog.cloud("gcp").instance_types["a3-highgpu-8g"].prices["europe-west4"],
    }
    aws_first = prices["aws"] <= prices["gcp"]
    assert got == (["aws-new", "aws-old", "gcp"] if aws_first else ["gcp", "aws-new", "aws-old"])
    assert [m.key for m in reusable(machines, "chat.eu", dep, lock, catalog, ["gcp"])] == ["gcp"]


@pytest.mark.parametrize(
    ("spillover", "error"),
    [
        (
            "release: halt",
            "{file}:13: deployments.chat.spillover.release: Input should be 'terminate' or "
            "'stop' (got 'halt')",
        ),
        (
            "warm_pool: {max_machines: 2}",
            "{file}:9: deployments.chat.spillover: warm_pool is set but release is "
            "terminate: no machine is ever stopped; set release: stop or remove warm_pool",
        ),
        (
            "release: stop\n      warm_pool: {max_machines: 0}",
            "{file}:14: deployments.chat.spillover.warm_pool.max_machines: Input should be "
            "greater than or equal to 1 (got 0)",
        ),
        (
            "release: stop\n      warm_pool: {max_stopped_s: -5}",
            "{file}:14: deployments.chat.spillover.warm_pool.max_stopped_s: Input should be "
            "greater than 0 (got -5)",
        ),
    ],
)
def test_a_bad_warm_pool_is_one_line_naming_the_file_line_and_field(
    tmp_path: Path, spillover: str, error: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "deployments:\n"
        "  chat:\n"
        "    model: chat\n"
        "    weights: /models/chat\n"
        "    sku: H100-80GB\n"
        "    gpus: 8\n"
        "    max_replicas: 2\n"
        "    autoscaling: {target: 2}\n"
        "    spillover:\n"
        "      enabled: true\n"
        "      residency: eu\n"
        "      max_spilled_replicas: 1\n"
        f"      {spillover}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_model(path, Policy)
    assert str(raised.value) == error.format(file=path)


def test_release_stop_alone_keeps_one_machine_for_an_hour() -> None:
    pool = policy(release="stop").deployments["chat.eu"].spillover.warm()
    assert pool == WarmPool(max_machines=1, max_stopped_s=3600)
    assert policy().deployments["chat.eu"].spillover.warm() is None
