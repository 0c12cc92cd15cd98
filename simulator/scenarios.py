"""Three ways to serve the same trace, simulated side by side, and what each one cost.

- ``reserved-only``: the reserved GPUs and nothing else (the policy with spillover off).
- ``on-demand``: no reserved GPUs; every replica rented on demand and scaled by request rate,
  the way a SkyServe-style service scales.
- ``policy``: the policy as written: reserved first, spilling inside its lock.

All three see the same requests, the same replica model and the same clouds. Reserved GPUs are
paid for the whole time, used or not, at the committed price; rented machines are paid from
launch to termination, as their cloud bills.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.runtimes.simulated_model import GpuProfile, profile_for_gpu
from common.configfile import InputError
from decisions.policy import Deployment, Lock, Policy, resolve_lock
from providers.catalog import Catalog, Offer, OfferRequest, default_catalog
from providers.errors import ProviderError
from simulator.cluster import OWNED, REJECTED, RESERVED, SPILLED, Cluster, Machine
from simulator.controllers import (
    OnDemandController,
    SpillwayController,
    allowed_offers,
    launch_option,
)
from simulator.probes import (
    percentile,
    replica_capacity,
    replica_throughput,
    replicas_for_mean_load,
    request_sizes,
)
from simulator.settings import SimSettings
from simulator.trace import Trace

SCENARIOS = ("reserved-only", "on-demand", "policy")
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
    #: Requests per second one replica holds within the TTFT target (None: not measured,
    #: the on-demand baseline's target was given).
    replica_capacity_rps: float | None
    #: Requests per second one replica finishes flat out (for utilization).
    replica_throughput_rps: float
    reserved_machines: int
    gpus_per_machine: int
    reserved_pool: str
    reserved_label: str
    on_demand_usd_per_gpu_hour: float
    reserved_usd_per_gpu_hour: float
    target_qps_per_replica: float
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
    capacity: float | None = None
    if settings.on_demand.target_qps_per_replica is None:
        capacity = replica_capacity(profile, sizes, slo, seed, probe, settings.fast_forward)
        if capacity <= 0:
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
    assert target_qps is not None
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

    @property
    def cost_total(self) -> float:
        return self.cost_reserved + self.cost_rented


def _without_spill(policy: Policy, name: str) -> Policy:
    dep = policy.deployments[name]
    spill = dep.spillover.model_copy(update={"enabled": False})
    changed = dep.model_copy(update={"spillover": spill})
    return policy.model_copy(update={"deployments": {**policy.deployments, name: changed}})


def _reserved_fleet(setup: Setup, cluster: Cluster) -> None:
    dep = setup.dep
    placed = 0
    for index in range(setup.reserved_machines):
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
        while len(machine.free_gpus) >= dep.gpus and placed < dep.max_replicas:
            cluster.place_replica(
                cluster.new_id("replica"), machine, machine.free_gpus[: dep.gpus], 0.0
            )
            placed += 1


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


def run_scenario(name: str, setup: Setup, trace: Trace, settings: SimSettings) -> ScenarioResult:
    """Simulate one of :data:`SCENARIOS` over the whole trace."""
    started = time.perf_counter()
    catalog = setup.catalog
    cluster = Cluster(
        setup.deployment,
        trace,
        setup.profile,
        settings,
        replica_gpus=setup.dep.gpus,
        weights_bytes=setup.weights_bytes,
        residency_of=lambda cloud, region: catalog.region(cloud, region).residency,
        seed_offset=SCENARIOS.index(name),
    )
    reserved_gpus = 0
    lock_errors: list[str] = []
    plans = 0
    if name == "on-demand":
        if not setup.offers:
            raise SimulationError(
                f"no offer for {setup.dep.gpus}x {setup.dep.sku} inside the lock of "
                f"{setup.deployment}: the on-demand baseline has nothing to rent"
            )
        window = settings.on_demand.qps_window_s
        first = sum(1 for t in trace.arrivals if t < window) / window
        controller_od = OnDemandController(
            setup.policy,
            setup.deployment,
            catalog,
            settings,
            setup.target_qps_per_replica,
        )
        # A running service: the replicas the first window asks for already serve.
        cheapest = launch_option(setup.offers[0])
        for _ in range(controller_od.target(first)):
            replica_id = cluster.new_id("od")
            machine = cluster.rent(replica_id, cheapest, registered_at=0.0)
            cluster.place_replica(replica_id, machine, machine.free_gpus, 0.0)
            controller_od.launched.append(replica_id)
        cluster.run(controller_od)
    else:
        policy = (
            setup.policy if name == "policy" else _without_spill(setup.policy, setup.deployment)
        )
        _reserved_fleet(setup, cluster)
        reserved_gpus = setup.reserved_gpus
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
        cost_rented=rented_cost(cluster, settings),
        episodes=spill_episodes(cluster),
        wall_s=time.perf_counter() - started,
        lock_errors=lock_errors,
        plans=plans,
    )


def _percentiles(sorted_values: Sequence[float]) -> dict[str, float]:
    return {f"p{q}": percentile(sorted_values, q) for q in (50, 90, 99)}


def slo_attainment(cluster: Cluster, slo_s: float) -> float:
    """Share of the trace's requests served with a time to first token within ``slo_s``
    (rejected requests count as misses)."""
    outcome, ttft = cluster.outcome, cluster.ttft
    within = sum(
        1 for i in range(len(outcome)) if outcome[i] in (RESERVED, SPILLED) and ttft[i] <= slo_s
    )
    return within / len(outcome)


def summarize(result: ScenarioResult, setup: Setup, settings: SimSettings) -> dict[str, Any]:
    """The numbers of one scenario, as plain data (the JSON output and the table use them)."""
    c = result.cluster
    trace = c.trace
    outcome = c.outcome
    served = [i for i in range(len(trace)) if outcome[i] in (RESERVED, SPILLED)]
    ttft = sorted(c.ttft[i] for i in served)
    e2e = sorted(c.e2e[i] for i in served)
    slo = settings.ttft_slo_s
    on_reserved = sum(1 for i in served if outcome[i] == RESERVED)
    output_tokens = sum(trace.output_tokens[i] for i in served)
    rejected = sum(1 for i in range(len(trace)) if outcome[i] == REJECTED)
    lost = len(trace) - len(served) - rejected
    horizon = c.horizon
    reserved_busy = sum(
        r.model.busy_s * len(r.gpu_indices) for r in c.replicas.values() if not r.spilled
    )
    reserved_replicas = result.reserved_gpus // setup.dep.gpus
    violations = 0
    for replica in c.replicas.values():
        m = replica.machine
        inside = (
            setup.lock.allows_region(m.provider, m.region)
            if m.rented
            else setup.lock.allows_agent(m.residency_label)
        )
        if not inside:
            violations += replica.served
    durations = [e.duration_s for e in result.episodes]
    total = result.cost_total
    return {
        "scenario": result.name,
        "requests": len(trace),
        "served": len(served),
        "served_on_reserved": on_reserved,
        "served_on_rented": len(served) - on_reserved,
        "rejected": rejected,
        "rejections": dict(c.rejections),
        "lost": lost,
        "ttft_s": _percentiles(ttft),
        "e2e_s": _percentiles(e2e),
        "slo_ttft_s": slo,
        "slo_attainment": slo_attainment(c, slo),
        "output_tokens": output_tokens,
        "cost_usd": {
            "reserved": result.cost_reserved,
            "rented": result.cost_rented,
            "total": total,
        },
        "usd_per_million_output_tokens": total / output_tokens * 1e6 if output_tokens else None,
        "reserved_gpus": result.reserved_gpus,
        # The load the reserved replicas served, against what they finish flat out...
        "reserved_utilization": (
            on_reserved / (reserved_replicas * setup.replica_throughput_rps * horizon)
            if reserved_replicas and horizon > 0
            else None
        ),
        # ... and the share of time they were running an iteration (as nvidia-smi counts it).
        "reserved_busy": (
            min(1.0, reserved_busy / (result.reserved_gpus * horizon))
            if result.reserved_gpus and horizon > 0
            else None
        ),
        "rented_machines": sum(1 for m in c.machines.values() if m.rented),
        "peak_rented_machines": max((t.rented for t in c.ticks), default=0),
        "spill_episodes": {
            "count": len(result.episodes),
            "total_s": sum(durations),
            "mean_s": sum(durations) / len(durations) if durations else 0.0,
            "longest_s": max(durations, default=0.0),
        },
        "events": dict(Counter(event.kind for event in c.events)),
        "residency_violations": violations,
        "lock_errors": result.lock_errors,
        "decisions": result.plans or len(c.ticks),
        "wall_s": result.wall_s,
    }


TUNE_WINDOW_S = 3600.0
TUNE_STEPS = 6


def tune_on_demand(setup: Setup, trace: Trace, settings: SimSettings) -> tuple[float, str]:
    """The largest target requests/s per replica with which the on-demand baseline keeps
    :data:`SLO_SHARE` within the TTFT target on the trace's first hour (bisection; a
    higher target rents fewer replicas, so it is the cheapest such setting), and a note."""
    start = setup.replica_capacity_rps or setup.target_qps_per_replica
    sample = trace.head(TUNE_WINDOW_S)

    def holds(target: float) -> bool:
        trial = replace(setup, target_qps_per_replica=target)
        result = run_scenario("on-demand", trial, sample, settings)
        return slo_attainment(result.cluster, settings.ttft_slo_s) >= SLO_SHARE

    low, high = 0.25 * start, 2.0 * start
    if holds(high):
        return high, f"on-demand target {high:.2f} requests/s per replica (the highest tried)"
    if not holds(low):
        return low, (
            f"on-demand target {low:.2f} requests/s per replica: even this misses "
            f"{SLO_SHARE:.0%} within the TTFT target on the first hour"
        )
    for _ in range(TUNE_STEPS):
        middle = (low + high) / 2
        if holds(middle):
            low = middle
        else:
            high = middle
    hours = sample.duration_s / 3600
    return low, (
        f"on-demand target tuned to {low:.2f} requests/s per replica: the highest that keeps "
        f"{SLO_SHARE:.0%} within the TTFT target over the first {hours:.1f} h"
    )
