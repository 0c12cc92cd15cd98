"""Who decides, in a simulation: Spillway's own planning, the on-demand baseline, or nobody.

:class:`SpillwayController` is the deployment workflow's loop without Temporal: every tick it
calls :func:`decisions.planning.plan_step`, the same function the ``plan_deployment`` activity
calls, with the same inputs the workflow keeps (load samples, last change, pending provisions,
replicas being released, the failure hold), and carries out the starts and releases it returns.
No decision is made here; only the bookkeeping the workflow does is repeated.

:class:`OnDemandController` is the baseline operators would otherwise pick: no reserved GPUs,
replicas rented on demand and scaled by request rate, as SkyServe does (target requests per
second per replica over a window, scale up or down only after the new target has held for a
delay). That logic is the baseline's, not Spillway's, so it lives here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from decisions.fleetview import ReplicaState
from decisions.planning import failover_offers, offers_in_lock, plan_step
from decisions.plantypes import (
    OfferChoice,
    PendingReplica,
    PlanInput,
    PlanOutput,
    SamplePoint,
    trim_samples,
)
from decisions.policy import Deployment, Policy, spill_providers
from providers.catalog import Catalog, Offer
from simulator.cluster import Cluster, LaunchOption
from simulator.settings import SimSettings

#: The PlanOutput fields a caller copies into the next PlanInput (see decisions.plantypes).
_CARRIED = tuple(
    f.name
    for f in fields(PlanInput)
    if f.name not in ("deployment", "samples", "last_change_at", "pending", "releasing")
    and f.name != "hold_until"
    and f.name in {g.name for g in fields(PlanOutput)}
)


def launch_option(choice: OfferChoice | Offer) -> LaunchOption:
    return LaunchOption(
        choice.cloud,
        choice.instance_type,
        choice.region,
        tuple(choice.zones),
        choice.usd_per_hour,
    )


class SpillwayController:
    """The deployment workflow's decisions, from ``plan_step``, against a simulated fleet."""

    def __init__(
        self,
        policy: Policy,
        deployment: str,
        catalog: Catalog,
        settings: SimSettings,
    ) -> None:
        self.policy = policy
        self.deployment = deployment
        self.catalog = catalog
        self.settings = settings
        self.interval_s = settings.decide_every_s
        self.samples: list[SamplePoint] = []
        self.last_change_at: float | None = None
        self.pending: list[PendingReplica] = []
        self.releasing: list[str] = []
        self.hold_until = 0.0
        self.lock_errors: list[str] = []
        self.plans = 0
        #: The episode and release bookkeeping plan_step asks its caller to carry.
        self.carried: dict[str, Any] = {}
        #: Every decision's one-line reason, with its time: the simulator's event log of why.
        self.reasons: list[tuple[float, str]] = []
        self._cluster: Cluster | None = None

    def tick(self, cluster: Cluster, now: float) -> None:
        self._cluster = cluster
        plan = plan_step(
            self.policy,
            cluster.snapshot(),
            self.catalog,
            PlanInput(
                self.deployment,
                self.samples,
                self.last_change_at,
                list(self.pending),
                list(self.releasing),
                self.hold_until,
                **self.carried,
            ),
            now,
            lambda: cluster.new_id("replica"),
            skip_zone=cluster.blocked,
            offers_per_provision=self.settings.launch_offers,
        )
        self.plans += 1
        if not plan.exists:
            raise ValueError(f"deployment {self.deployment!r} is not in the policy")
        self.carried = {name: getattr(plan, name) for name in _CARRIED if hasattr(plan, name)}
        if plan.starts or plan.releases:
            self.reasons.append((now, plan.reason))
            cluster.decision(plan.reason)
        if plan.sample is not None:
            self.samples.append(plan.sample)
        self.samples = trim_samples(self.samples, now - plan.window_s)
        cluster.signal = plan.sample.value if plan.sample is not None else None
        if plan.lock_error and plan.lock_error not in self.lock_errors:
            self.lock_errors.append(plan.lock_error)
        changed = False
        for release in plan.releases:
            if release.replica_id in self.releasing:
                continue
            self.releasing.append(release.replica_id)
            cluster.release(release.replica_id, self)
            changed = True
        for start in plan.starts:
            self.pending.append(
                PendingReplica(
                    start.replica_id,
                    f"provision-{start.replica_id}",
                    start.where,
                    start.agent_id,
                    start.gpu_indices,
                    start.offers[0].usd_per_hour if start.offers else 0.0,
                    since=now,
                )
            )
            if start.where == "reserved":
                cluster.start_on_reserved(start.replica_id, start.agent_id, start.gpu_indices, self)
            else:
                cluster.provision(start.replica_id, [launch_option(o) for o in start.offers], self)
            changed = True
        if changed:
            self.last_change_at = now

    def provision_finished(self, replica_id: str, ok: bool, now: float) -> None:
        self.pending = [p for p in self.pending if p.replica_id != replica_id]
        if not ok:
            self.hold_until = now + self.settings.failure_backoff_s
        if self._cluster is not None:
            self._cluster.wake()

    def release_finished(self, replica_id: str, now: float) -> None:
        self.releasing = [r for r in self.releasing if r != replica_id]
        if self._cluster is not None:
            self._cluster.wake()


def allowed_offers(
    policy: Policy,
    dep: Deployment,
    catalog: Catalog,
    skip_zone: Callable[[str, str, str], bool] | None = None,
) -> list[Offer]:
    """Offers for the deployment's SKU from its providers inside its lock, cheapest first."""
    if not spill_providers(policy, dep):  # none allowed and no credentials: nothing to rent
        return []
    return offers_in_lock(policy, dep, catalog, skip_zone)


class IdleController:
    """Decides nothing: a scenario with no replicas to scale (everything to managed endpoints)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s

    def tick(self, cluster: Cluster, now: float) -> None:
        cluster.signal = None

    def provision_finished(self, replica_id: str, ok: bool, now: float) -> None:
        return None

    def release_finished(self, replica_id: str, now: float) -> None:
        return None


class OnDemandController:
    """SkyServe-style request-rate autoscaling over rented machines only."""

    def __init__(
        self,
        policy: Policy,
        deployment: str,
        catalog: Catalog,
        settings: SimSettings,
        target_qps_per_replica: float,
    ) -> None:
        self.policy = policy
        self.dep = policy.deployments[deployment]
        self.catalog = catalog
        self.settings = settings
        self.target_qps = target_qps_per_replica
        baseline = settings.on_demand
        self.interval_s = baseline.decision_interval_s
        self.up_after = max(1, int(baseline.upscale_delay_s / self.interval_s))
        self.down_after = max(1, int(baseline.downscale_delay_s / self.interval_s))
        self.window_s = baseline.qps_window_s
        #: Replicas launched or serving, oldest first.
        self.launched: list[str] = []
        self.up = 0
        self.down = 0
        self.deficit = 0

    def target(self, qps: float) -> int:
        wanted = math.ceil(qps / self.target_qps - 1e-9)
        if qps > 0:
            wanted = max(wanted, 1)
        return max(self.dep.min_replicas, min(self.dep.max_replicas, wanted))

    def tick(self, cluster: Cluster, now: float) -> None:
        qps = cluster.qps(self.window_s)
        cluster.signal = qps
        if self.deficit:
            launch, self.deficit = self.deficit, 0
            self._launch(cluster, launch)
        target = self.target(qps)
        current = len(self.launched)
        if target > current:
            self.up, self.down = self.up + 1, 0
            if self.up >= self.up_after:
                self.up = 0
                self._launch(cluster, target - current)
        elif target < current:
            self.up, self.down = 0, self.down + 1
            if self.down >= self.down_after:
                self.down = 0
                self._remove(cluster, current - target)
        else:
            self.up = self.down = 0

    def _launch(self, cluster: Cluster, count: int) -> None:
        offers = allowed_offers(self.policy, self.dep, self.catalog, cluster.blocked)
        if not offers:
            self.deficit += count
            return
        choices = failover_offers(
            self.policy,
            self.dep,
            self.catalog,
            offers[0],
            None,
            self.settings.launch_offers,
            cluster.blocked,
        )
        options = [launch_option(c) for c in choices]
        for _ in range(count):
            replica_id = cluster.new_id("od")
            self.launched.append(replica_id)
            cluster.provision(replica_id, options, self)

    def _remove(self, cluster: Cluster, count: int) -> None:
        for replica_id in reversed(list(self.launched)):
            if count == 0:
                return
            replica = cluster.replicas.get(replica_id)
            if replica is None or replica.state is not ReplicaState.HEALTHY:
                continue  # still being provisioned: SkyServe lets it come up
            self.launched.remove(replica_id)
            cluster.release(replica_id, self)
            count -= 1

    def provision_finished(self, replica_id: str, ok: bool, now: float) -> None:
        if not ok and replica_id in self.launched:
            self.launched.remove(replica_id)
            self.deficit += 1  # the service still wants it: launched again at the next decision

    def release_finished(self, replica_id: str, now: float) -> None:
        return None
