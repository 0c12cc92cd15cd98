"""The control plane's activities: plan, launch, wait for agents and replicas, drain at the
gateways, terminate, list, and the warm pool's (stop a released machine, start a stopped one).

They run in the scheduler process (task queue ``spillway-control``), next to the fleet state
the gRPC server keeps, the policy in force and the provider adapters. Cloud SDK calls block, so
they run in a thread while the activity heartbeats; a worker that dies mid-call is noticed
within the heartbeat timeout and the call is retried, which is safe because launch is
idempotent by key and terminate is idempotent.

Errors: a provider error a retry cannot fix becomes a non-retryable ``ApplicationError`` whose
``type`` is the error class (``CapacityError``, ``QuotaError``, ``ResidencyError``, ...), so the
provision workflow decides from the type alone; transient errors are left to the retry policy.

This module decides nothing by itself: placement and autoscaling are pure functions in
``decisions/``, the order of steps is the workflows'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError

from decisions.fleetview import ReplicaState
from decisions.planning import plan_step
from decisions.plantypes import PlanInput, PlanOutput, Timeouts
from decisions.policy import resolve_lock, spill_providers
from decisions.warmpool import (
    WarmMachine,
    expired,
    owner_workflow,
    pool_of,
    price_of,
    release_action,
    reusable,
    same_label,
    warm_machine,
)
from providers.base import (
    CLAIM_LABEL,
    DEPLOYMENT_LABEL,
    INSTANCE_TYPE_LABEL,
    KEY_LABEL,
    WARM_LABEL,
    CapacityMemory,
    Instance,
    LaunchRequest,
    Provider,
)
from providers.catalog import Catalog
from providers.errors import (
    CannotStopError,
    CapacityError,
    ProviderError,
    QuotaError,
    ResidencyError,
    TransientError,
    UnknownSkuError,
)
from scheduler.config import SpillSettings
from scheduler.fleet import AgentHealth, FleetState
from scheduler.policystore import PolicyStore
from scheduler.snapshot import snapshot_from_fleet
from workflows.types import (
    DrainAtGatewaysInput,
    DrainAtGatewaysOutput,
    FindMachinesInput,
    FindMachinesOutput,
    LaunchInput,
    LaunchOutput,
    ManagedMachine,
    ReleaseMachineInput,
    ReleaseMachineOutput,
    TerminateInput,
    TerminateOutput,
    WaitAgentInput,
    WaitAgentOutput,
    WaitReplicaInput,
    WaitReplicaOutput,
    WarmStartInput,
    WarmStartOutput,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
HEARTBEAT_EVERY_S = 1.0
POLL_S = 0.2
#: After a start, wait this many report intervals before acting: every agent has reported.
WARMUP_INTERVALS = 2.0
#: A gateway that reported within this many report intervals is waited for by a drain.
GATEWAY_RECENT_INTERVALS = 2.0


def refusal(exc: ProviderError) -> ApplicationError:
    """A provider error as the application error the workflows decide on."""
    retryable = isinstance(exc, TransientError)
    return ApplicationError(str(exc), type=type(exc).__name__, non_retryable=not retryable)


@dataclass
class ControlPlane:
    """What the activities act on; one per scheduler process."""

    fleet: FleetState
    policies: PolicyStore
    catalog: Catalog
    providers: dict[str, Provider]
    settings: SpillSettings
    decide_every_s: float
    memory: CapacityMemory = field(default_factory=CapacityMemory)
    #: Set once connected; the sweeper asks it whether a provision still runs.
    client: Client | None = None
    #: Called with (deployment, offer description) right before each launch call (benchmarks).
    on_launch: Callable[[str, str], None] | None = None
    #: cloud -> the image its machines boot.
    images: dict[str, str] = field(default_factory=dict)
    #: When this control plane started (monotonic): the fleet is rebuilt from reports after it.
    started_at: float = field(default_factory=time.monotonic)


async def _heartbeating(func: Callable[[], T], what: str) -> T:
    """Run blocking ``func`` in a thread, heartbeating until it returns."""
    task = asyncio.ensure_future(asyncio.to_thread(func))
    while True:
        done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_S)
        if done:
            return task.result()
        activity.heartbeat(what)


class ControlActivities:
    """The activities, bound to one :class:`ControlPlane`."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        #: Taking a machine out of the warm pool is one step at a time in this process.
        self._claim_lock = asyncio.Lock()

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.plan_deployment,
            self.launch_instance,
            self.wait_for_agent,
            self.wait_for_replica,
            self.drain_at_gateways,
            self.terminate_instance,
            self.find_machines,
            self.release_machine,
            self.start_warm_machine,
        ]

    def _provider(self, cloud: str) -> Provider:
        provider = self.plane.providers.get(cloud)
        if provider is None:
            raise ApplicationError(
                f"no provider is configured for {cloud!r} (configured: "
                f"{', '.join(sorted(self.plane.providers)) or 'none'}); add clouds.{cloud} to "
                "the scheduler config",
                type="ProviderNotConfigured",
                non_retryable=True,
            )
        return provider

    @activity.defn(name="plan_deployment")
    async def plan_deployment(self, request: PlanInput) -> PlanOutput:
        """Autoscaling and placement for one deployment against the live fleet and policy."""
        plane = self.plane
        store = plane.policies
        fleet = plane.fleet
        snapshot = snapshot_from_fleet(
            fleet.agents(),
            plane.catalog,
            gateways=fleet.gateways(within_s=fleet.stale_after_s),
            draining=fleet.draining(),
        )
        clouds = set(plane.providers)

        def skip(cloud: str, itype: str, zone: str) -> bool:
            return cloud not in clouds or plane.memory.blocked(cloud, itype, zone)

        out = plan_step(
            store.policy,
            snapshot,
            plane.catalog,
            request,
            time.time(),
            lambda: f"{request.deployment[:48]}-{uuid.uuid4().hex[:8]}",
            skip_zone=skip,
            offers_per_provision=plane.settings.launch_offers,
            clouds=frozenset(clouds),
            observing=self._observing(request.deployment),
        )
        s = plane.settings
        out.policy_digest = store.digest
        out.timeouts = Timeouts(
            register_s=s.register_timeout_s,
            prefetch_s=s.prefetch_timeout_s,
            start_s=s.start_timeout_s,
            drain_s=s.drain_timeout_s,
            heartbeat_s=s.heartbeat_timeout_s,
        )
        out.decide_every_s = plane.decide_every_s
        out.failure_backoff_s = s.failure_backoff_s
        out.weights_dir = s.weights_dir
        out.weights_endpoint_url = s.weights_endpoint_url or ""
        if store.errors:
            out.notes.append(
                f"the newest edit of the policy was refused, the previous one is in force: "
                f"{store.errors[0]}"
            )
        return out

    def _warming_up(self) -> str:
        """Why no agent can be presumed missing yet (the scheduler just started); or empty."""
        since = time.monotonic() - self.plane.started_at
        warmup = self.plane.fleet.report_interval_s * WARMUP_INTERVALS
        if since < warmup:
            return f"the scheduler started {since:.1f}s ago; agents report within {warmup:g}s"
        return ""

    def _observing(self, deployment: str) -> str:
        """Why the fleet is not fully known yet for ``deployment``; empty when it is."""
        plane, fleet = self.plane, self.plane.fleet
        if warming := self._warming_up():
            return warming
        dep = plane.policies.policy.deployments.get(deployment)
        pools = set(dep.pools) if dep is not None else set()
        quiet = sorted(
            record.agent_id
            for record, _ in fleet.agents()
            if record.report is None and record.registration.labels.pool in pools
        )
        if quiet:
            return f"waiting for the first report of {', '.join(quiet)}"
        return ""

    @activity.defn(name="launch_instance")
    async def launch_instance(self, request: LaunchInput) -> LaunchOutput:
        """Launch (or find, by key) the machine for one offer, inside the policy in force now."""
        offer = request.offer
        provider = self._provider(offer.cloud)
        policy = self.plane.policies.policy
        dep = policy.deployments.get(request.deployment)
        if dep is None or not dep.spillover.enabled:
            raise ApplicationError(
                f"{request.deployment}: the policy in force no longer lets it spill; "
                f"{offer.describe()} not launched",
                type="PolicyForbids",
                non_retryable=True,
            )
        if offer.cloud not in spill_providers(policy, dep):
            raise ApplicationError(
                f"{request.deployment}: {offer.cloud} is no longer an allowed provider",
                type="PolicyForbids",
                non_retryable=True,
            )
        lock = resolve_lock(policy, dep, self.plane.catalog)
        if lock.regions is None:
            allowed = frozenset(self.plane.catalog.cloud(offer.cloud).regions)
        else:
            allowed = frozenset(r for c, r in lock.regions if c == offer.cloud)
        launch = LaunchRequest(
            key=request.key,
            instance_type=offer.instance_type,
            region=offer.region,
            image=self.plane.images.get(offer.cloud, ""),
            allowed_regions=allowed,
            labels={
                DEPLOYMENT_LABEL: request.deployment,
                INSTANCE_TYPE_LABEL: offer.instance_type,
            },
            zones=tuple(offer.zones),
        )
        if self.plane.on_launch is not None:
            self.plane.on_launch(request.deployment, offer.describe())
        try:
            instance = await _heartbeating(
                lambda: provider.launch(launch), f"launching {offer.describe()}"
            )
        except (CapacityError, QuotaError, UnknownSkuError) as exc:
            for zone in offer.zones or [""]:
                self.plane.memory.mark(offer.cloud, offer.instance_type, zone)
            raise refusal(exc) from exc
        except ResidencyError as exc:
            raise refusal(exc) from exc
        except ProviderError as exc:
            raise refusal(exc) from exc
        log.info(
            "launched %s for %s as %s (%s)",
            offer.describe(),
            request.deployment,
            instance.instance_id,
            request.key,
        )
        return LaunchOutput(
            key=request.key,
            cloud=instance.cloud,
            instance_id=instance.instance_id,
            region=instance.region,
            zone=instance.zone,
            instance_type=instance.instance_type,
        )

    @activity.defn(name="wait_for_agent")
    async def wait_for_agent(self, request: WaitAgentInput) -> WaitAgentOutput:
        """Return once an agent on the machine of ``key`` has registered and reports."""
        deadline = time.monotonic() + request.timeout_s
        last_beat = 0.0
        while True:
            for record, health in self.plane.fleet.agents():
                reg = record.registration
                if reg.labels.extra.get(KEY_LABEL) != request.key:
                    continue
                if health is AgentHealth.CONNECTED and record.report is not None:
                    return WaitAgentOutput(reg.agent_id, [g.index for g in reg.gpus])
            now = time.monotonic()
            if now >= deadline:
                raise ApplicationError(
                    f"no agent registered from the machine of {request.key} within "
                    f"{request.timeout_s:.0f}s",
                    type="AgentNeverRegistered",
                    non_retryable=True,
                )
            if now - last_beat >= HEARTBEAT_EVERY_S:
                activity.heartbeat(f"waiting for the agent of {request.key}")
                last_beat = now
            await asyncio.sleep(POLL_S)

    @activity.defn(name="wait_for_replica")
    async def wait_for_replica(self, request: WaitReplicaInput) -> WaitReplicaOutput:
        """Return once the fleet state shows the replica healthy: it serves the deployment."""
        deadline = time.monotonic() + request.timeout_s
        last_beat = 0.0
        state = "unknown"
        while True:
            record = self.plane.fleet.get(request.agent_id)
            if record is not None and record.report is not None:
                for replica in record.report.replicas:
                    if replica.replica_id != request.replica_id:
                        continue
                    state = replica.state.value
                    if replica.state is ReplicaState.HEALTHY:
                        return WaitReplicaOutput(request.replica_id, state)
                    if replica.state is ReplicaState.FAILED:
                        raise ApplicationError(
                            f"replica {request.replica_id} failed on {request.agent_id}: "
                            f"{replica.state_reason}",
                            type="ReplicaFailed",
                            non_retryable=True,
                        )
            now = time.monotonic()
            if now >= deadline:
                raise ApplicationError(
                    f"replica {request.replica_id} on {request.agent_id} not reported healthy "
                    f"within {request.timeout_s:.0f}s (last seen: {state})",
                    type="NeverHealthy",
                    non_retryable=True,
                )
            if now - last_beat >= HEARTBEAT_EVERY_S:
                activity.heartbeat(state)
                last_beat = now
            await asyncio.sleep(POLL_S)

    @activity.defn(name="drain_at_gateways")
    async def drain_at_gateways(self, request: DrainAtGatewaysInput) -> DrainAtGatewaysOutput:
        """Stop the gateways routing to a replica, then wait until none has a request in
        flight to it.

        The replica is marked draining in fleet state, so every fleet watch shows it DRAINING
        at once (before its agent says so). Then the activity waits until every gateway that
        reported within the last two report intervals has reported again since the mark, with
        nothing in flight to the replica, or until ``deadline_s`` passes; it returns how many
        requests were still in flight then. A gateway that stops reporting stops being waited
        for; with no gateway at all it returns at once.
        """
        fleet = self.plane.fleet
        replica_id = request.replica_id
        marked = fleet.mark_draining(replica_id)
        marked_at = fleet.now()
        deadline = time.monotonic() + request.deadline_s
        window = fleet.report_interval_s * GATEWAY_RECENT_INTERVALS
        last_beat = 0.0
        while True:
            recent = fleet.gateways(within_s=window)
            in_flight = sum(g.in_flight(replica_id) for g in recent)
            behind = [g.gateway_id for g in recent if g.last_seen < marked_at]
            now = time.monotonic()
            if (not behind and in_flight == 0) or now >= deadline:
                if in_flight:
                    log.warning(
                        "gateways still have %d requests in flight to %s after %.0fs",
                        in_flight,
                        replica_id,
                        request.deadline_s,
                    )
                return DrainAtGatewaysOutput(replica_id, in_flight, len(recent), marked)
            if now - last_beat >= HEARTBEAT_EVERY_S:
                activity.heartbeat(
                    f"{in_flight} in flight to {replica_id} at {len(recent)} gateways"
                    + (f"; waiting for reports of {', '.join(behind)}" if behind else "")
                )
                last_beat = now
            await asyncio.sleep(POLL_S)

    @activity.defn(name="terminate_instance")
    async def terminate_instance(self, request: TerminateInput) -> TerminateOutput:
        """Terminate the machine of ``key``; silent when it is already gone."""
        provider = self._provider(request.cloud)
        try:
            await _heartbeating(
                lambda: provider.terminate(request.key), f"terminating {request.key}"
            )
        except TransientError as exc:
            raise refusal(exc) from exc
        except ProviderError as exc:
            # Anything else is retried too: a machine must never be left behind silently.
            raise ApplicationError(str(exc), type=type(exc).__name__) from exc
        log.info("terminated %s on %s: %s", request.key, request.cloud, request.reason)
        return TerminateOutput(request.key, True)

    @activity.defn(name="find_machines")
    async def find_machines(self, _: FindMachinesInput) -> FindMachinesOutput:
        """Every managed machine on every configured cloud, each with its owner if it has one:
        a machine is owned while the provision that launched it runs, or while its agent hosts
        a replica of a deployment in the policy in force; and, so that no leak is judged on an
        incomplete view, while this scheduler warms up or its agent has not reported yet.
        """
        plane, serving, warming = self.plane, dict[str, str](), self._warming_up()
        policy = plane.policies.policy
        for record, _health in plane.fleet.agents():
            if not (key := record.registration.labels.extra.get(KEY_LABEL)):
                continue
            if record.report is None:
                serving[key] = f"not known yet: agent {record.agent_id} has not reported"
            for replica in record.report.replicas if record.report else ():
                if replica.deployment in policy.deployments:
                    serving[key] = f"serves {replica.deployment} ({replica.replica_id})"
        out = FindMachinesOutput(now=time.time())
        listed = await self._managed(sorted(plane.providers), out.errors)
        warm = {w.key: w for w in (warm_machine(i) for i in listed) if w is not None}
        expire = expired(warm.values(), policy, out.now)
        for instance in listed:
            pooled = warm.get(instance.key)
            if pooled is not None:
                owner = f"warm pool of {pooled.deployment} since {pooled.since:.0f}"
            else:
                owner = serving.get(instance.key, "")
            if not owner:
                owner = await self._provision_owner(owner_workflow(instance))
            if not owner and warming:
                owner = f"not known yet: {warming}"
            out.machines.append(
                ManagedMachine(
                    instance.cloud,
                    instance.key,
                    instance.instance_id,
                    instance.region,
                    owner,
                    expire=expire.get(instance.key, ""),
                )
            )
        return out

    async def _managed(self, clouds: list[str], errors: list[str] | None = None) -> list[Instance]:
        """Every managed machine of ``clouds``; a cloud that cannot be listed is skipped (and
        named in ``errors``)."""
        found: list[Instance] = []
        for cloud in clouds:
            provider = self.plane.providers.get(cloud)
            if provider is None:
                continue
            try:
                found.extend(await _heartbeating(provider.list_managed, f"listing {cloud}"))
            except ProviderError as exc:
                if errors is not None:
                    errors.append(f"{cloud}: {exc}")
        return found

    async def _provision_owner(self, workflow_id: str) -> str:
        """ "provision W runs" when that provision workflow is still running."""
        client = self.plane.client
        if client is None or not workflow_id.startswith("provision-"):
            return ""
        with contextlib.suppress(Exception):
            described = await client.get_workflow_handle(workflow_id).describe()
            if described.status == WorkflowExecutionStatus.RUNNING:
                return f"provision {workflow_id} runs"
        return ""

    # -- the warm pool -----------------------------------------------------------------------

    @activity.defn(name="release_machine")
    async def release_machine(self, request: ReleaseMachineInput) -> ReleaseMachineOutput:
        """Stop a released replica's machine into its deployment's warm pool, or terminate it.

        Stopped when the policy in force says ``release: stop``, the machine can be stopped and
        the pool has room (:func:`decisions.warmpool.release_action`); terminated otherwise,
        with the reason. The warm label (written before the stop) carries the release's own
        time, so a retry that finds it goes on stopping; a machine another provision has taken
        out of the pool since is left alone.
        """
        provider = self._provider(request.cloud)
        key = request.key
        out = ReleaseMachineOutput(key)
        instance = await self._cloud(lambda: provider.describe(key), f"finding {key}")
        if instance is None:
            out.terminated = True
            out.outcome = "machine already gone"
            return out
        since = str(int(request.since))
        mine = instance.label(WARM_LABEL) == since or same_label(
            owner_workflow(instance), f"provision-{request.replica_id}"
        )
        if not mine:
            out.outcome = (
                f"machine {instance.instance_id} left as it is: {owner_workflow(instance)} "
                "has taken it from the warm pool since"
            )
            return out
        dep = self.plane.policies.policy.deployments.get(request.deployment)
        warm = dep.spillover.warm() if dep is not None else None
        kept = 0
        if warm is not None and not instance.cannot_stop:
            pool = pool_of(await self._warm_machines(), request.deployment)
            kept = len([m for m in pool if m.key != key])
        why = release_action(warm, instance.cannot_stop, kept, request.deployment)
        if not why:
            try:
                await self._cloud(
                    lambda: provider.set_labels(key, {WARM_LABEL: since, CLAIM_LABEL: None}),
                    f"marking {key} warm",
                )
                await self._cloud(lambda: provider.stop(key), f"stopping {key}")
            except ApplicationError as exc:
                if not exc.non_retryable:
                    raise
                why = f"it could not be stopped ({exc.message})"
            else:
                out.stopped = True
                out.outcome = f"machine {instance.instance_id} stopped into the warm pool"
                log.info("stopped %s on %s: %s", key, request.cloud, request.reason)
                return out
        await self._cloud(lambda: provider.terminate(key), f"terminating {key}")
        out.terminated = True
        out.outcome = f"machine terminated: {why}"
        log.info("terminated %s on %s: %s; %s", key, request.cloud, request.reason, why)
        return out

    @activity.defn(name="start_warm_machine")
    async def start_warm_machine(self, request: WarmStartInput) -> WarmStartOutput:
        """Start a stopped machine of the deployment's warm pool for the provision
        ``request.claim``, or say why none was started (the provision then launches).

        The claim (the provision's workflow id) is written on the machine before it is
        started, so a retry finds and starts the same machine; a machine that cannot be
        started now (no capacity) goes back into the pool.
        """
        plane = self.plane
        policy = plane.policies.policy
        dep = policy.deployments.get(request.deployment)
        out = WarmStartOutput()
        if dep is None or not dep.spillover.enabled or dep.spillover.warm() is None:
            return out  # no warm pool: nothing to say, the provision launches
        clouds = [c for c in spill_providers(policy, dep) if c in plane.providers]
        async with self._claim_lock:
            listed = await self._managed(clouds)
            chosen = next(
                (i for i in listed if same_label(i.label(CLAIM_LABEL), request.claim)), None
            )
            since = time.time()
            if chosen is None:
                warm = [w for w in (warm_machine(i) for i in listed) if w is not None]
                lock = resolve_lock(policy, dep, plane.catalog)
                fits = reusable(warm, request.deployment, dep, lock, plane.catalog, clouds)
                if not fits:
                    out.note = "no stopped machine of the warm pool fits"
                    return out
                pick = fits[0]
                since = pick.since
                chosen = next(i for i in listed if i.key == pick.key)
                owner = plane.providers[pick.cloud]
                await self._cloud(
                    lambda: owner.set_labels(
                        pick.key, {CLAIM_LABEL: request.claim, WARM_LABEL: None}
                    ),
                    f"claiming {pick.key}",
                )
                # Read back: another control plane may have claimed it at the same moment.
                claimed = await self._cloud(lambda: owner.describe(pick.key), "reading back")
                if claimed is None or not same_label(claimed.label(CLAIM_LABEL), request.claim):
                    out.note = f"warm machine {pick.instance_id} was taken by another provision"
                    return out
        provider = plane.providers[chosen.cloud]
        key = chosen.key
        try:
            started = await self._cloud(lambda: provider.start(key), f"starting {key}")
        except ApplicationError as exc:
            if not exc.non_retryable:
                raise  # retried: the claim brings the retry back to this machine
            await self._cloud(
                lambda: provider.set_labels(key, {WARM_LABEL: str(int(since)), CLAIM_LABEL: None}),
                f"returning {key} to the warm pool",
            )
            out.note = f"warm machine {chosen.instance_id} did not start ({exc.message})"
            return out
        if started is None:
            out.note = f"warm machine {chosen.instance_id} is gone"
            return out
        out.machine = LaunchOutput(
            key=key,
            cloud=started.cloud,
            instance_id=started.instance_id,
            region=started.region,
            zone=started.zone,
            instance_type=started.instance_type,
        )
        out.usd_per_hour = price_of(
            plane.catalog, started.cloud, started.instance_type, started.region
        )
        out.note = (
            f"started warm machine {started.instance_id} ({started.cloud} "
            f"{started.instance_type} in {started.region})"
        )
        log.info("%s for %s (%s)", out.note, request.deployment, request.claim)
        return out

    async def _warm_machines(self) -> list[WarmMachine]:
        listed = await self._managed(sorted(self.plane.providers))
        return [w for w in (warm_machine(i) for i in listed) if w is not None]

    async def _cloud(self, func: Callable[[], T], what: str) -> T:
        """A provider call in a thread, heartbeating; its errors as application errors (only
        a transient one, or one that a later try may get past, is retried)."""
        try:
            return await _heartbeating(func, what)
        except (CannotStopError, CapacityError, QuotaError) as exc:
            raise refusal(exc) from exc
        except TransientError as exc:
            raise refusal(exc) from exc
        except ProviderError as exc:
            raise ApplicationError(str(exc), type=type(exc).__name__) from exc
