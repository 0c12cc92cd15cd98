"""The warm pool: which released machines are stopped rather than terminated, which stopped
machine a new replica starts again, and which stopped machines must go.

A deployment with ``spillover.release: stop`` keeps machines it no longer needs stopped, with
their disks (and the weights on them), so that the next spill starts one (boot + start, no
download) instead of launching a new one. The machine itself is the record: labels say it is
warm, since when, and for which deployment (``providers.base.WARM_LABEL``,
``DEPLOYMENT_LABEL``), and a provision that takes it out of the pool writes its own workflow id
(``CLAIM_LABEL``) before starting it, so that a retried activity finds what it already did.

Pure functions over plain values (machines as the providers describe them, the policy, a
time): the control plane's activities and the simulator decide with the same code. No I/O,
no clocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from decisions.policy import Deployment, Lock, Policy, WarmPool
from providers.base import CLAIM_LABEL, DEPLOYMENT_LABEL, WARM_LABEL, Instance, label_safe
from providers.catalog import Catalog


@dataclass(frozen=True, slots=True)
class WarmMachine:
    """A stopped (or stopping) machine in a deployment's warm pool."""

    cloud: str
    key: str
    instance_id: str
    instance_type: str
    region: str
    state: str
    #: The deployment label as the machine carries it (label-safe: see ``label_safe``).
    deployment: str
    #: When it was released into the pool (seconds since the epoch).
    since: float


def warm_machine(instance: Instance) -> WarmMachine | None:
    """``instance`` as a warm-pool machine, or None when it is not one (no warm label, or a
    provision has claimed it since)."""
    since = instance.label(WARM_LABEL)
    if not since or instance.label(CLAIM_LABEL):
        return None
    try:
        at = float(since)
    except ValueError:
        return None
    return WarmMachine(
        cloud=instance.cloud,
        key=instance.key,
        instance_id=instance.instance_id,
        instance_type=instance.instance_type,
        region=instance.region,
        state=instance.state,
        deployment=label_safe(instance.label(DEPLOYMENT_LABEL)),
        since=at,
    )


def owner_workflow(instance: Instance) -> str:
    """The provision workflow that owns ``instance``: the one that claimed it from the warm
    pool, or else the one that launched it (its key is that workflow's id plus the offer's
    position)."""
    return instance.label(CLAIM_LABEL) or instance.key.rsplit(".", 1)[0]


def same_label(a: str, b: str) -> bool:
    """Whether two label values are the same once every cloud's label rules are applied."""
    return label_safe(a) == label_safe(b)


def release_action(warm: WarmPool | None, cannot_stop: str, kept: int, name: str) -> str:
    """Why a released machine is terminated rather than stopped; "" when it is stopped.

    ``kept`` is how many machines ``name`` keeps stopped already (this one not counted).
    """
    if warm is None:
        return f"{name} releases with terminate"
    if cannot_stop:
        return f"it cannot be stopped ({cannot_stop})"
    if kept >= warm.max_machines:
        return f"the warm pool of {name} is full ({kept} of {warm.max_machines} machines stopped)"
    return ""


def pool_of(machines: Iterable[WarmMachine], name: str) -> list[WarmMachine]:
    """The warm machines of deployment ``name``, newest first."""
    mine = [m for m in machines if m.deployment == label_safe(name)]
    return sorted(mine, key=lambda m: (-m.since, m.key))


def reusable(
    machines: Iterable[WarmMachine],
    name: str,
    deployment: Deployment,
    lock: Lock,
    catalog: Catalog,
    clouds: Iterable[str],
) -> list[WarmMachine]:
    """Stopped machines of ``name`` a new replica may start, best first.

    Only what a launch for it now could rent: a cloud it may rent from, a region inside its
    lock, an instance type of its SKU with enough GPUs. Cheapest list price first, then the
    newest (the least likely to be terminated soon).
    """
    allowed = set(clouds)
    found: list[tuple[float, float, str, WarmMachine]] = []
    for machine in pool_of(machines, name):
        if machine.state != "stopped" or machine.cloud not in allowed:
            continue
        if not lock.allows_region(machine.cloud, machine.region):
            continue
        itype = catalog.cloud(machine.cloud).instance_types.get(machine.instance_type)
        if itype is None or itype.sku != deployment.sku or itype.gpus < deployment.gpus:
            continue
        price = itype.prices.get(machine.region, float("inf"))
        found.append((price, -machine.since, machine.key, machine))
    return [m for *_, m in sorted(found, key=lambda t: t[:3])]


def price_of(catalog: Catalog, cloud: str, instance_type: str, region: str) -> float:
    """The list price per hour of ``instance_type`` in ``region`` (0 when unknown)."""
    itype = catalog.cloud(cloud).instance_types.get(instance_type)
    return itype.prices.get(region, 0.0) if itype is not None else 0.0


def expired(machines: Iterable[WarmMachine], policy: Policy, now: float) -> dict[str, str]:
    """key -> why the machine must be terminated now, for warm machines past their bounds.

    Per deployment: those stopped longer than ``max_stopped_s``, then the oldest beyond
    ``max_machines``; every warm machine of a deployment that left the policy or no longer
    releases with stop.
    """
    names: Mapping[str, str] = {label_safe(n): n for n in policy.deployments}
    by_deployment: dict[str, list[WarmMachine]] = {}
    for machine in machines:
        by_deployment.setdefault(machine.deployment, []).append(machine)
    out: dict[str, str] = {}
    for label, group in sorted(by_deployment.items()):
        name = names.get(label)
        deployment = policy.deployments.get(name) if name is not None else None
        warm = deployment.spillover.warm() if deployment is not None else None
        if name is None or warm is None:
            why = (
                f"warm machine of {label or 'no deployment'}, which is not in the policy"
                if name is None
                else f"warm machine of {name}, which now releases with terminate"
            )
            for machine in group:
                out[machine.key] = why
            continue
        kept = 0
        for machine in sorted(group, key=lambda m: (-m.since, m.key)):
            age = now - machine.since
            if age > warm.max_stopped_s:
                out[machine.key] = (
                    f"warm machine of {name} stopped {age:.0f}s ago, longer than "
                    f"max_stopped_s {warm.max_stopped_s:g}"
                )
            elif kept >= warm.max_machines:
                out[machine.key] = (
                    f"warm machine of {name} beyond max_machines {warm.max_machines} "
                    f"(stopped {age:.0f}s ago; newer ones are kept)"
                )
            else:
                kept += 1
    return out
