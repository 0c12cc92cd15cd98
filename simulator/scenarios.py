"""Ways to serve the same trace, simulated side by side, and what each one cost.

With the customer's reserved GPUs (committed: paid for either way):

- ``reserved-only``: the reserved GPUs and nothing else (no spilling, no managed endpoints).
- ``reserved-for-peak``: the smallest static reservation that holds the SLO without spilling
  (found by :func:`simulator.searches.peak_reservation`).
- ``rent-only``: the policy with its managed endpoints removed: reserved, then rented.
- ``policy``: the policy as written: reserved, rented, managed overflow, inside its lock.

Without a reservation, for the decision whether to reserve at all:

- ``on-demand``: every replica rented on demand and scaled by request rate, the way a
  SkyServe-style service scales, at its best target (:func:`simulator.searches.on_demand_target`).
- ``managed-only``: everything to the deployment's managed endpoints.

And ``hindsight-bound`` (:mod:`simulator.hindsight`), computed rather than played: the cheapest
way to serve the overflow beyond the same reserved GPUs knowing the future.

All see the same requests through the same simulated gateway, the same replica model and the
same clouds. Reserved GPUs are paid for the whole time, used or not, at the committed price;
rented machines are paid from launch to termination, as their cloud bills; managed endpoints
per token at their list prices.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.runtimes.simulated_model import GpuProfile, profile_for_gpu
from common.configfile import InputError
from decisions.endpoints import ManagedEndpoint
from decisions.policy import Deployment, Lock, Policy, resolve_lock
from providers.catalog import Catalog, Offer, OfferRequest, default_catalog
from providers.errors import ProviderError
from simulator.cluster import OWNED, Cluster, Machine
from simulator.controllers import (
    IdleController,
    OnDemandController,
    SpillwayController,
    allowed_offers,
    launch_option,
)
from simulator.probes import (
    replica_capacity,
    replica_throughput,
    replicas_for_mean_load,
    request_sizes,
)
from simulator.settings import SimSettings
from simulator.trace import Trace
from simulator.warmpool import WarmPoolModel

#: Every scenario, in the order they are shown.
SCENARIOS = (
    "reserved-only",
    "reserved-for-peak",
    "rent-only",
    "policy",
    "on-demand",
    "managed-only",
    "hindsight-bound",
)
#: The scenarios played through the simulated world (the bound is computed).
PLAYED = SCENARIOS[:-1]
#: Scenarios that use the customer's reserved GPUs.
WITH_RESERVED = frozenset({"reserved-only", "reserved-for-peak", "rent-only", "policy"})
WITH_RESERVED |= {"hindsight-bound"}
#: Share of requests a scenario must keep within the TTFT target to count as holding it.
SLO_SHARE = 0.99


class SimulationError(InputError):
    """The simulation cannot be set up (no such deployment, nothing to serve it with)."""


@dataclass(frozen=True)
class Setup:
    """Everything the three scenarios share, resolved once."""

    deployment: str
    dep: Deployment
    policy: Policy
    catalog: Catalog
    lock: Lock
    profile: GpuProfile
    #: Offers the deployment may rent inside its lock, cheapest first (empty: none).
    offers: tuple[Offer, ...]
    params_b: float
    weights_bytes: float
    #: Requests per second one replica holds within the TTFT target in a load test.
    replica_capacity_rps: float
    #: Requests per second one replica finishes flat out (for utilization).
    replica_throughput_rps: float
    reserved_machines: int
    gpus_per_machine: int
    reserved_pool: str
    reserved_label: str
    on_demand_usd_per_gpu_hour: float
    reserved_usd_per_gpu_hour: float
    target_qps_per_replica: float
    #: The deployment's managed endpoints inside its lock (route() uses no other).
    managed: tuple[ManagedEndpoint, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def reserved_gpus(self) -> int:
        return self.reserved_machines * self.gpus_per_machine


def _price_per_gpu_hour(inside: Sequence[Offer], dep: Deployment, catalog: Catalog) -> float:
    if inside:
        return inside[0].usd_per_gpu_hour
    try:
        anywhere = catalog.offers(OfferRequest(dep.sku, dep.gpus))
    except ProviderError:
        anywhere = []
    if not anywhere:
        raise SimulationError(
            f"no cloud in the catalog sells {dep.gpus}x {dep.sku}; set reserved.usd_per_gpu_hour "
            "in the settings to price the reserved GPUs"
        )
    return anywhere[0].usd_per_gpu_hour


def prepare(
    policy: Policy,
    trace: Trace,
    settings: SimSettings,
    deployment: str | None = None,
    catalog: Catalog | None = None,
) -> Setup:
    """Resolve the deployment, its replica model, prices and the reserved fleet."""
    catalog = catalog or default_catalog()
    if deployment is None:
        if len(policy.deployments) != 1:
            raise SimulationError(
                f"the policy has {len(policy.deployments)} deployments "
                f"({', '.join(policy.deployments)}); say which one the trace is for "
                "with --deployment"
            )
        deployment = next(iter(policy.deployments))
    dep = policy.deployments.get(deployment)
    if dep is None:
        raise SimulationError(
            f"no deployment {deployment!r} in the policy; it has {', '.join(policy.deployments)}"
        )
    if len(trace) == 0:
        raise SimulationError("the trace has no requests")
    notes: list[str] = []
    params = settings.params_for(dep.model)
    base = profile_for_gpu(settings.gpu_profile or dep.sku)
    profile = base.scaled(tp=dep.gpus, speedup=8.0 / params)
    lock = resolve_lock(policy, dep, catalog)
    slo, seed, probe = settings.ttft_slo_s, settings.seed, settings.probe_requests
    sizes = request_sizes(trace, seed)
    capacity = replica_capacity(profile, sizes, slo, seed, probe, settings.fast_forward)
    if capacity <= 0 and settings.on_demand.target_qps_per_replica is None:
        raise SimulationError(
            f"one replica of {dep.model} on {dep.gpus}x {dep.sku} cannot keep the time to "
            f"first token within {slo:g}s for this trace's requests even when idle; set "
            "on_demand.target_qps_per_replica in the settings to run the baseline anyway"
        )
    reserved = settings.reserved
    per_machine = reserved.gpus_per_machine or dep.gpus
    if per_machine < dep.gpus:
        raise SimulationError(
            f"reserved.gpus_per_machine is {per_machine}, but a replica of {deployment} needs "
            f"{dep.gpus} GPUs on one machine"
        )
    if reserved.machines is None:
        replicas = replicas_for_mean_load(
            profile, sizes, trace.mean_rate(), slo, seed, probe, settings.fast_forward
        )
        per = per_machine // dep.gpus
        machines = math.ceil(replicas / per)
        notes.append(
            f"reserved GPUs sized to the mean load: {replicas} replicas ({machines} machines) "
            f"keep the TTFT target at a steady {trace.mean_rate():.2f} requests/s"
        )
    else:
        machines = reserved.machines
    if not dep.pools and machines:
        notes.append(f"{deployment} names no reserved pool; the reserved GPUs cannot serve it")
    pool = reserved.pool or (dep.pools[0] if dep.pools else "reserved")
    label = reserved.residency_label
    if label is None:
        label = sorted(lock.agent_labels)[0] if lock.agent_labels else ""
    offers = tuple(allowed_offers(policy, dep, catalog))
    on_demand_price = _price_per_gpu_hour(offers, dep, catalog)
    reserved_price = reserved.usd_per_gpu_hour or on_demand_price * (1 - reserved.discount)
    target_qps = settings.on_demand.target_qps_per_replica or capacity
    managed = tuple(e for e in dep.managed if lock.allows_group(e.residency_group))
    return Setup(
        deployment=deployment,
        dep=dep,
        policy=policy,
        catalog=catalog,
        lock=lock,
        profile=profile,
        offers=offers,
        params_b=params,
        weights_bytes=settings.weights_bytes_for(dep.model),
        replica_capacity_rps=capacity,
        replica_throughput_rps=replica_throughput(profile, sizes),
        reserved_machines=machines,
        gpus_per_machine=per_machine,
        reserved_pool=pool,
        reserved_label=label,
        on_demand_usd_per_gpu_hour=on_demand_price,
        reserved_usd_per_gpu_hour=reserved_price,
        target_qps_per_replica=target_qps,
        managed=managed,
        notes=tuple(notes),
    )


@dataclass
class Episode:
    start: float
    end: float

    @property
    def duration_s(self) -> float:
        return self.end - self.start


@dataclass
class ScenarioResult:
    name: str
    cluster: Cluster
    reserved_gpus: int
    cost_reserved: float
    cost_rented: float
    episodes: list[Episode]
    wall_s: float
    lock_errors: list[str] = field(default_factory=list)
    plans: int = 0
    cost_managed: float = 0.0
    #: What the scenario was run with (a searched target, a searched reservation).
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def cost_overflow(self) -> float:
        """Everything beyond the reservation: rented machines and managed endpoints."""
        return self.cost_rented + self.cost_managed

    @property
    def cost_total(self) -> float:
        return self.cost_reserved + self.cost_overflow


def _with(policy: Policy, name: str, **update: Any) -> Policy:
    dep = policy.deployments[name].model_copy(update=update)
    return policy.model_copy(update={"deployments": {**policy.deployments, name: dep}})


def without_managed(policy: Policy, name: str) -> Policy:
    return _with(policy, name, managed=[])


def reserved_alone(policy: Policy, name: str, replicas: int | None = None) -> Policy:
    """The deployment on its reserved GPUs only: no spilling, no managed endpoints; with
    ``replicas``, allowed that many (a larger static reservation)."""
    dep = policy.deployments[name]
    spill = dep.spillover.model_copy(update={"enabled": False})
    update: dict[str, Any] = {"spillover": spill, "managed": []}
    if replicas is not None and replicas > dep.max_replicas:
        update["max_replicas"] = replicas
    return _with(policy, name, **update)


def _reserved_fleet(setup: Setup, cluster: Cluster, machines: int, max_replicas: int) -> int:
    """The reserved machines, their replicas already serving; the replicas placed."""
    dep = setup.dep
    placed = 0
    for index in range(machines):
        machine = cluster.add_machine(
            Machine(
                machine_id=f"reserved-{index + 1}",
                provider=OWNED,
                region="vpc",
                residency_label=setup.reserved_label,
                pool=setup.reserved_pool,
                gpus=setup.gpus_per_machine,
                usd_per_hour=0.0,
            )
        )
        if setup.reserved_pool not in dep.pools:
            continue
        # A running fleet: reserved GPUs already serve (up to max_replicas), from the start.
        while len(machine.free_gpus) >= dep.gpus and placed < max_replicas:
            cluster.place_replica(
                cluster.new_id("replica"), machine, machine.free_gpus[: dep.gpus], 0.0
            )
            placed += 1
    return placed


def billed_seconds(settings: SimSettings, cloud: str, seconds: float, ended: bool) -> float:
    """Seconds a cloud bills for a machine held ``seconds``; rounded only once it ended."""
    if not ended:
        return seconds
    model = settings.cloud(cloud)
    rounded = math.ceil(seconds / model.billing_granularity_s - 1e-9) * model.billing_granularity_s
    return max(model.billing_minimum_s, rounded)


def rented_cost(cluster: Cluster, settings: SimSettings) -> float:
    total = 0.0
    for machine in cluster.machines.values():
        if not machine.rented or machine.launched_at >= cluster.horizon:
            continue
        end = machine.terminated_at
        ended = end is not None and end <= cluster.horizon
        if end is None or not ended:
            end = cluster.horizon
        seconds = billed_seconds(settings, machine.provider, end - machine.launched_at, ended)
        total += seconds / 3600 * machine.usd_per_hour
    return total


def spill_episodes(cluster: Cluster) -> list[Episode]:
    """Stretches of time with at least one rented machine paid for, merged."""
    spans = sorted(
        (m.launched_at, min(m.terminated_at or cluster.horizon, cluster.horizon))
        for m in cluster.machines.values()
        if m.rented and m.launched_at < cluster.horizon
    )
    episodes: list[Episode] = []
    for start, end in spans:
        if episodes and start <= episodes[-1].end:
            episodes[-1].end = max(episodes[-1].end, end)
        else:
            episodes.append(Episode(start, end))
    return episodes


def miss_budget(trace: Trace, share: float = SLO_SHARE) -> int:
    """The most requests that may miss the TTFT target while ``share`` of them still hold it."""
    return len(trace) - math.ceil(share * len(trace) - 1e-9)


def run_scenario(
    name: str,
    setup: Setup,
    trace: Trace,
    settings: SimSettings,
    *,
    reserved_machines: int | None = None,
    target_qps: float | None = None,
    stop_after_misses: int | None = None,
) -> ScenarioResult:
    """Simulate one of :data:`PLAYED` over the whole trace.

    ``reserved_machines`` sizes the reservation of ``reserved-for-peak`` (default: the
    setup's), ``target_qps`` the on-demand baseline's target (default: the setup's). With
    ``stop_after_misses`` the run ends with :class:`~simulator.cluster.TooManyMisses` as soon as
    more requests than that have missed the TTFT target (the searches' early stop).
    """
    if name not in PLAYED:
        raise ValueError(f"no scenario {name!r}; expected one of {', '.join(PLAYED)}")
    started = time.perf_counter()
    catalog = setup.catalog
    dep = setup.dep
    machines = setup.reserved_machines if reserved_machines is None else reserved_machines
    uses_reserved = name in WITH_RESERVED
    if name == "reserved-for-peak":
        policy = reserved_alone(setup.policy, setup.deployment, machines * _per_machine(setup))
    elif name == "reserved-only":
        policy = reserved_alone(setup.policy, setup.deployment)
    elif name in ("rent-only", "on-demand"):
        policy = without_managed(setup.policy, setup.deployment)
    else:
        policy = setup.policy
    managed = setup.managed if name in ("policy", "managed-only") else ()
    cluster = Cluster(
        setup.deployment,
        trace,
        setup.profile,
        settings,
        replica_gpus=dep.gpus,
        weights_bytes=setup.weights_bytes,
        residency_of=lambda cloud, region: catalog.region(cloud, region).residency,
        seed_offset=SCENARIOS.index(name),
        lock=setup.lock,
        routing=dep.gateway,
        managed=managed,
        reserved_pools=dep.pools if uses_reserved else (),
        miss_budget=stop_after_misses,
    )
    if name in ("rent-only", "policy") and policy.deployments[setup.deployment].spillover.warm():
        disk_gb = settings.warm_pool_disk_gb or 2 * setup.weights_bytes / 1e9
        cluster.warm_pool = WarmPoolModel(
            policy, setup.deployment, catalog, disk_gb, settings.disk_usd_per_gb_month
        )
    reserved_gpus = machines * setup.gpus_per_machine if uses_reserved else 0
    lock_errors: list[str] = []
    plans = 0
    parameters: dict[str, Any] = {}
    if name == "on-demand":
        if not setup.offers:
            raise SimulationError(
                f"no offer for {dep.gpus}x {dep.sku} inside the lock of "
                f"{setup.deployment}: the on-demand baseline has nothing to rent"
            )
        target = setup.target_qps_per_replica if target_qps is None else target_qps
        parameters["target_qps_per_replica"] = target
        window = settings.on_demand.qps_window_s
        first = sum(1 for t in trace.arrivals if t < window) / window
        controller_od = OnDemandController(policy, setup.deployment, catalog, settings, target)
        # A running service: the replicas the first window asks for already serve.
        cheapest = launch_option(setup.offers[0])
        for _ in range(controller_od.target(first)):
            replica_id = cluster.new_id("od")
            machine = cluster.rent(replica_id, cheapest, registered_at=0.0)
            cluster.place_replica(replica_id, machine, machine.free_gpus, 0.0)
            controller_od.launched.append(replica_id)
        cluster.run(controller_od)
    elif name == "managed-only":
        if not managed:
            raise SimulationError(
                f"{setup.deployment} has no managed endpoint inside its lock: "
                "there is no managed-only scenario"
            )
        cluster.run(IdleController(settings.decide_every_s))
    else:
        limit = policy.deployments[setup.deployment].max_replicas
        placed = _reserved_fleet(setup, cluster, machines, limit)
        if name == "reserved-for-peak":
            parameters["reserved_machines"] = machines
            parameters["reserved_replicas"] = placed
        controller = SpillwayController(policy, setup.deployment, catalog, settings)
        cluster.run(controller)
        lock_errors = controller.lock_errors
        plans = controller.plans
    hours = cluster.horizon / 3600
    return ScenarioResult(
        name=name,
        cluster=cluster,
        reserved_gpus=reserved_gpus,
        cost_reserved=reserved_gpus * hours * setup.reserved_usd_per_gpu_hour,
        cost_rented=rented_cost(cluster, settings)
        + (cluster.warm_pool.disk_usd(cluster.horizon) if cluster.warm_pool else 0.0),
        episodes=spill_episodes(cluster),
        wall_s=time.perf_counter() - started,
        lock_errors=lock_errors,
        plans=plans,
        cost_managed=cluster.gateway.managed_cost_usd,
        parameters=parameters,
    )


def _per_machine(setup: Setup) -> int:
    return max(1, setup.gpus_per_machine // setup.dep.gpus)
