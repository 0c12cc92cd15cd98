"""Policy edits while the control plane runs: a new lock is obeyed even by a provision already in
flight, a broken edit never replaces the policy in force, and a lock no offer can satisfy is
reported plainly instead of being retried."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from providers.catalog import default_catalog
from tests.conftest import eventually
from tests.workflows.conftest import ControlPlaneHarness, ec2_instances, eventually_async
from tests.workflows.test_spill import spill_policy, start_saturated_reserved, upload_weights

CATALOG = default_catalog()


def live_machines(moto_server: str, prefix: str) -> list[tuple[str, str]]:
    """(region, key) of every live machine whose key starts with ``prefix``, in any region."""
    out = []
    for region in CATALOG.cloud("aws").regions:
        out += [(region, m["key"]) for m in ec2_instances(moto_server, region, prefix)]
    return out


async def test_a_lock_moved_during_a_provision_leaves_nothing_outside_the_new_lock(
    control: ControlPlaneHarness, tmp_path: Path, moto_server: str, aws_credentials: None
) -> None:
    weights = upload_weights(moto_server, f"weights-{uuid.uuid4().hex[:8]}")
    name = control.name("chat")
    policy = spill_policy(name, f"reserved-{control.suffix}", weights)
    name, host = await start_saturated_reserved(control, tmp_path, moto_server, policy)
    load = control.load(name, per_replica=10)
    load.start()
    prefix = f"provision-{name}-"

    # A provision is in flight once its machine's agent has registered; the replica is not
    # serving yet. (The fleet is read in-process; EC2 is asked in a thread, off the loop that
    # runs the scheduler.)
    def rented() -> list[tuple[str, str]]:
        assert control.scheduler is not None
        return [
            (r.registration.labels.region, r.registration.labels.extra["spillway-key"])
            for r, _ in control.scheduler.fleet.agents()
            if "spillway-key" in r.registration.labels.extra
        ]

    await eventually(rented, within_s=60, interval=0.02)
    ((region, first_key),) = rented()
    assert CATALOG.region("aws", region).residency == "eu"
    assert [k for _, k in await asyncio.to_thread(live_machines, moto_server, prefix)] == [
        first_key
    ]
    first_digest = control.store.digest

    # The operator moves the lock to `us` while that provision runs.
    policy["deployments"][name]["spillover"]["residency"] = "us"
    control.write_policy(policy)
    await eventually(lambda: control.store.digest != first_digest, within_s=10)
    live: list[tuple[str, str]] = []

    async def inside_new_lock() -> bool:
        live[:] = await asyncio.to_thread(live_machines, moto_server, prefix)
        return all(CATALOG.region("aws", r).residency == "us" for r, _ in live)

    # The eu machine is given back; whatever serves the load now runs in `us`.
    await eventually_async(inside_new_lock, within_s=90, interval=0.5)
    assert first_key not in [k for _, k in live]
    status = await host.status(name)
    assert status.policy_digest == control.store.digest
    assert any(f"policy {control.store.digest} in force" in line for line in status.recent)
    await load.stop()

    # A broken edit is refused; the policy in force stays, and the workflow says so.
    in_force = control.store.digest
    control.policy_path.write_text("deployments:\n  broken: [this is not a deployment\n")
    await eventually(lambda: control.store.errors != [], within_s=10)
    assert control.store.digest == in_force

    async def noted() -> bool:
        status = await host.status(name)
        return any("refused" in n and "policy.yaml" in n for n in status.notes)

    await eventually_async(noted, within_s=10)
    assert (await host.status(name)).policy_digest == in_force


async def test_a_deployment_nothing_can_be_rented_for_is_reported_not_retried(
    control: ControlPlaneHarness, tmp_path: Path, moto_server: str, aws_credentials: None
) -> None:
    """(A lock that no catalog offer satisfies is refused by ``policy check`` already; at run
    time the same happens when the lock's only clouds are not configured in the scheduler.)"""
    weights = upload_weights(moto_server, f"weights-{uuid.uuid4().hex[:8]}")
    name = control.name("chat")
    policy = spill_policy(name, f"reserved-{control.suffix}", weights, providers=["gcp"])
    policy["credentials"]["gcp"] = {"file": "/etc/spillway/gcp.json", "project": "p"}
    name, host = await start_saturated_reserved(control, tmp_path, moto_server, policy)
    load = control.load(name, per_replica=10)
    load.start()

    async def reported() -> bool:
        return bool((await host.status(name)).lock_error)

    try:
        await eventually_async(reported, within_s=30)
    except AssertionError:
        raise AssertionError(await host.status(name)) from None
    status = await host.status(name)
    assert status.lock_error == (
        "spillover may use gcp, but this scheduler rents only from aws (the clouds section of "
        "its config); nothing can be rented for this deployment"
    )
    assert status.pending == []
    assert live_machines(moto_server, f"provision-{name}-") == []
    # Reported once in the event log, however many ticks pass.
    ticks = status.ticks
    await eventually_async(lambda: _ticks_past(host, name, ticks + 8), within_s=20)
    status = await host.status(name)
    assert sum("cannot place" in line for line in status.recent) == 1


async def _ticks_past(host: object, name: str, ticks: int) -> bool:
    from spillway.serve.control_plane import ControlHost

    assert isinstance(host, ControlHost)
    return (await host.status(name)).ticks >= ticks
