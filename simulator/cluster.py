"""The simulated world of one deployment: machines, replicas, a router, clouds and a clock.

Replicas are :class:`~agent.runtimes.simulated_model.BatchingModel` instances, the model the
simulated runtime serves with. Requests reach them through the deployment's simulated gateway
(:mod:`simulator.gateway`): the gateway's own routing function, reserved before rented before
managed endpoints, inside the residency lock, then its bounded queue; a replica being drained
takes no new ones. Machines rented from a cloud are billed from the accepted launch call to
termination, rounded as the cloud bills; each launch attempt (one offer, one zone) can fail for
capacity with the cloud's probability, which marks the zone in a capacity memory as the adapters
do, and the provision walks on to the next zone and offer. A machine boots, downloads the
weights at the prefetch rate, starts the replica, and only then takes traffic.

Who decides what to start and stop is a :class:`Controller`, called every tick: Spillway's own
planning (:mod:`simulator.controllers`) or a baseline. The cluster only carries out
decisions and tells the controller how they ended, as the workflows' signals do.

Deterministic: one seeded random stream, events ordered by (time, sequence).
"""

from __future__ import annotations

import heapq
import math
import random
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent.runtimes.simulated_model import BatchingModel, GpuProfile, Progress, RequestRejected
from decisions.endpoints import GatewayRouting, ManagedEndpoint
from decisions.fleetview import AgentView, FleetSnapshot, ReplicaState, ReplicaView
from decisions.policy import Lock
from decisions.routing import Tier
from simulator.gateway import MANAGED, REJECTED, RESERVED, SPILLED, Dispatch, SimGateway
from simulator.settings import SimSettings
from simulator.trace import Trace
from simulator.warmpool import WarmPoolModel

__all__ = ["MANAGED", "OWNED", "REJECTED", "RESERVED", "SPILLED", "Cluster", "TooManyMisses"]

#: The provider label of machines the operator owns (not rented from a cloud).
OWNED = "owned"
#: The pool label of rented machines (never one of a deployment's reserved pools).
RENTED_POOL = "spillover"


class TooManyMisses(Exception):
    """A run stopped early: more requests missed the TTFT target than its budget allows."""


@dataclass(frozen=True, slots=True)
class LaunchOption:
    """One offer a provision may try: an instance type in a region, its zones, its price."""

    cloud: str
    instance_type: str
    region: str
    zones: tuple[str, ...]
    usd_per_hour: float


@dataclass(slots=True)
class Machine:
    machine_id: str
    provider: str  # OWNED or a cloud
    region: str
    residency_label: str
    pool: str
    gpus: int
    usd_per_hour: float
    instance_type: str = ""
    launched_at: float = 0.0
    registered_at: float = 0.0
    terminated_at: float | None = None
    free_gpus: list[int] = field(default_factory=list)

    @property
    def rented(self) -> bool:
        return self.provider != OWNED


@dataclass(slots=True)
class Replica:
    replica_id: str
    machine: Machine
    gpu_indices: tuple[int, ...]
    model: BatchingModel
    state: ReplicaState
    drain_started_at: float | None = None
    last_finish_at: float = 0.0
    served: int = 0
    #: As the gateway sees it: its tier, labels, cap and when it became healthy.
    tier: Tier = Tier.RESERVED
    residency_group: str = ""
    cloud: str = ""
    region: str = ""
    cap: int = 1
    healthy_since: float = -math.inf

    @property
    def spilled(self) -> bool:
        return self.machine.rented

    @property
    def in_flight(self) -> int:
        return self.model.in_flight


@dataclass(slots=True)
class Event:
    at: float
    kind: str  # launch, capacity_error, provision_failed, healthy, release, terminated
    replica_id: str
    text: str


@dataclass(slots=True)
class TickSample:
    at: float
    reserved: int  # healthy replicas on reserved GPUs
    spilled: int  # healthy replicas on rented machines
    rented: int  # rented machines being paid for (booting, serving or draining)
    signal: float | None


class Controller(Protocol):
    """Decides what to start and stop; told how each provision and release ended."""

    interval_s: float

    def tick(self, cluster: Cluster, now: float) -> None: ...

    def provision_finished(self, replica_id: str, ok: bool, now: float) -> None: ...

    def release_finished(self, replica_id: str, now: float) -> None: ...


class Cluster:
    """One scenario's world; :meth:`run` plays the trace through it."""

    def __init__(
        self,
        deployment: str,
        trace: Trace,
        profile: GpuProfile,
        settings: SimSettings,
        *,
        replica_gpus: int = 1,
        weights_bytes: float = 0.0,
        residency_of: Callable[[str, str], str] = lambda cloud, region: "",
        seed_offset: int = 0,
        lock: Lock | None = None,
        routing: GatewayRouting | None = None,
        managed: Sequence[ManagedEndpoint] = (),
        reserved_pools: Sequence[str] = (),
        miss_budget: int | None = None,
    ) -> None:
        self.deployment = deployment
        #: GPUs of one replica, and of each machine rented for one.
        self.replica_gpus = replica_gpus
        #: Bytes of weights a new machine downloads before its replica starts.
        self.weights_bytes = weights_bytes
        #: (cloud, region) -> its residency group.
        self.residency_of = residency_of
        self.trace = trace
        self.profile = profile
        self.settings = settings
        self.rng = random.Random(settings.seed * 1_000_003 + seed_offset)
        self.now = 0.0
        self.horizon = trace.duration_s
        self.machines: dict[str, Machine] = {}
        self.replicas: dict[str, Replica] = {}
        self.events: list[Event] = []
        self.ticks: list[TickSample] = []
        self.signal: float | None = None
        #: (cloud, instance type, zone) -> until when it is skipped.
        self.no_capacity: dict[tuple[str, str, str], float] = {}
        n = len(trace)
        self.ttft = array("d", bytes(8 * n))
        self.e2e = array("d", bytes(8 * n))
        self.outcome = array("b", [-1]) * n
        self.rejections: dict[str, int] = {}
        self._active: list[Replica] = []  # starting, healthy or draining: advanced as time goes
        self._serving: list[Replica] = []  # healthy: takes new requests
        self.reserved_pools = frozenset(reserved_pools)
        routing = routing or GatewayRouting()
        cap = profile.max_running_requests
        if routing.max_concurrency_per_replica:
            cap = min(cap, routing.max_concurrency_per_replica)
        self.replica_cap = cap
        #: Stop the run (:class:`TooManyMisses`) once more requests than this missed the target.
        self.miss_budget = miss_budget
        self.misses = 0
        #: Released machines kept stopped (``spillover.release: stop``); None: terminated.
        self.warm_pool: WarmPoolModel | None = None
        self.gateway = SimGateway(
            lock or Lock(None, None, None),
            routing,
            managed,
            profile,
            trace.input_tokens,
            trace.output_tokens,
            trace.arrivals,
            Dispatch(
                now=lambda: self.now,
                replicas=lambda: self._serving,
                submit=self._submit,  # type: ignore[arg-type]
                managed_done=self._managed_done,
                reject=self._reject,
                at=self.at,
                refresh=self._advance_all,
            ),
            managed_output_tokens_per_s=settings.managed_output_tokens_per_s,
            poll_s=settings.gateway_poll_s,
            ttft_s=settings.ttft_slo_s,
        )
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._ids = 0
        self.arrivals_seen: deque[float] = deque()
        self._release_controllers: dict[str, Controller] = {}
        self._decide_now: Callable[[], None] | None = None

    # -- building ------------------------------------------------------------------------------

    def add_machine(self, machine: Machine) -> Machine:
        machine.free_gpus = list(range(machine.gpus))
        self.machines[machine.machine_id] = machine
        return machine

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    def place_replica(
        self,
        replica_id: str,
        machine: Machine,
        gpu_indices: Sequence[int],
        ready_at: float,
        on_ready: Callable[[], None] | None = None,
    ) -> Replica:
        """Start a replica on ``machine`` now; it takes traffic from ``ready_at``."""
        held = set(gpu_indices)
        if not held <= set(machine.free_gpus):
            raise ValueError(f"GPUs {sorted(held)} of {machine.machine_id} are not all free")
        machine.free_gpus = [g for g in machine.free_gpus if g not in held]
        replica = Replica(
            replica_id,
            machine,
            tuple(gpu_indices),
            BatchingModel(self.profile, self.now, fast_forward=self.settings.fast_forward),
            ReplicaState.STARTING,
            tier=Tier.RESERVED if machine.pool in self.reserved_pools else Tier.RENTED,
            residency_group=machine.residency_label,
            cloud=machine.provider,
            region=machine.region,
            cap=self.replica_cap,
        )
        self.replicas[replica_id] = replica
        self._active.append(replica)

        def ready() -> None:
            if replica.state is not ReplicaState.STARTING:
                return
            replica.state = ReplicaState.HEALTHY
            replica.model.advance(self.now)
            # A fleet already serving at the start is warm, as the gateway takes it.
            replica.healthy_since = self.now if self.now > 0 else -math.inf
            self._serving.append(replica)
            self._event("healthy", replica_id, f"serving on {_where(machine)}")
            if on_ready is not None:
                on_ready()
            self.gateway.pump()

        if ready_at <= self.now:
            ready()
        else:
            self.at(ready_at, ready)
        return replica

    # -- actions a controller takes ------------------------------------------------------------

    def rent(self, replica_id: str, option: LaunchOption, registered_at: float) -> Machine:
        """A machine rented from ``option`` for ``replica_id``, billed from now; its agent
        registers at ``registered_at``."""
        return self.add_machine(
            Machine(
                machine_id=f"{option.cloud}-{replica_id}",
                provider=option.cloud,
                region=option.region,
                residency_label=self.residency_of(option.cloud, option.region),
                pool=RENTED_POOL,
                gpus=self.replica_gpus,
                usd_per_hour=option.usd_per_hour,
                instance_type=option.instance_type,
                launched_at=self.now,
                registered_at=registered_at,
            )
        )

    def start_on_reserved(
        self, replica_id: str, agent_id: str, gpu_indices: Sequence[int], on_done: Controller
    ) -> None:
        machine = self.machines[agent_id]
        self.place_replica(
            replica_id,
            machine,
            gpu_indices,
            self.now + self.settings.replica_start_s,
            on_ready=lambda: on_done.provision_finished(replica_id, True, self.now),
        )

    def provision(
        self, replica_id: str, options: Sequence[LaunchOption], controller: Controller
    ) -> None:
        """Rent a machine for ``replica_id``: walk ``options`` and their zones until one launch
        is accepted, then boot, prefetch and start; tell ``controller`` how it ended."""
        attempts = [(o, z) for o in options for z in (o.zones or ("",))]
        s = self.settings
        if self.warm_pool is not None and self._restart(replica_id, controller):
            return

        def attempt(index: int) -> None:
            if index >= len(attempts):
                self._event(
                    "provision_failed",
                    replica_id,
                    f"no capacity in any of {len(attempts)} zones of {len(options)} offers",
                )
                controller.provision_finished(replica_id, False, self.now)
                return
            option, zone = attempts[index]
            cloud = s.cloud(option.cloud)
            if self.rng.random() < cloud.capacity_error(option.instance_type, option.region):
                done = self.now + s.launch_call_s
                self.no_capacity[(option.cloud, option.instance_type, zone)] = (
                    done + s.capacity_memory_s
                )
                self._event(
                    "capacity_error",
                    replica_id,
                    f"{option.cloud} {option.instance_type} {zone or option.region}: no capacity",
                )
                self.at(done, lambda: attempt(index + 1))
                return
            launched = self.now + s.launch_call_s

            def launch() -> None:
                machine = self.rent(replica_id, option, self.now + cloud.boot_s)
                self._event(
                    "launch",
                    replica_id,
                    f"{option.cloud} {option.instance_type} in {zone or option.region} "
                    f"at ${option.usd_per_hour:.2f}/h",
                )
                start = machine.registered_at + self.weights_bytes / (s.prefetch_mb_per_s * 1e6)

                def begin() -> None:
                    self.place_replica(
                        replica_id,
                        machine,
                        list(range(machine.gpus)),
                        self.now + s.replica_start_s,
                        on_ready=lambda: controller.provision_finished(replica_id, True, self.now),
                    )

                self.at(start, begin)

            self.at(launched, launch)

        attempt(0)

    def _restart(self, replica_id: str, controller: Controller) -> bool:
        """Start a stopped machine of the warm pool for ``replica_id``: boot and replica start,
        no weight download; billed again from now."""
        assert self.warm_pool is not None
        taken = self.warm_pool.take(self.now)
        if taken is None:
            return False
        s = self.settings
        option = LaunchOption(
            taken.cloud, taken.instance_type, taken.region, (), taken.usd_per_hour
        )
        boot = s.cloud(taken.cloud).boot_s
        machine = self.rent(replica_id, option, self.now + s.launch_call_s + boot)
        self._event("restart", replica_id, f"{_where(machine)} started from the warm pool")

        def begin() -> None:
            self.place_replica(
                replica_id,
                machine,
                list(range(machine.gpus)),
                self.now + s.replica_start_s,
                on_ready=lambda: controller.provision_finished(replica_id, True, self.now),
            )

        self.at(machine.registered_at, begin)
        return True

    def release(self, replica_id: str, controller: Controller) -> None:
        """Stop routing to ``replica_id``; when its requests are done, give its machine back."""
        replica = self.replicas.get(replica_id)
        if replica is None or replica.state in (ReplicaState.DRAINING, ReplicaState.STOPPED):
            return
        was_serving = replica.state is ReplicaState.HEALTHY
        replica.state = ReplicaState.DRAINING
        replica.drain_started_at = self.now
        if was_serving:
            self._serving.remove(replica)
        self._event("release", replica_id, f"draining on {_where(replica.machine)}")
        self._release_controllers[replica_id] = controller
        self._finish_drains()

    def decision(self, reason: str) -> None:
        """A decision that started or released something, in the one line that explains it."""
        self._event("decision", "", reason)

    def wake(self) -> None:
        """Decide again now, outside the regular ticks (a provision or release just ended), as
        a workflow woken by a signal does."""
        if self.now <= self.horizon and self._decide_now is not None:
            self.at(self.now, self._decide_now)

    def blocked(self, cloud: str, instance_type: str, zone: str) -> bool:
        until = self.no_capacity.get((cloud, instance_type, zone))
        return until is not None and self.now < until

    # -- reading the world ---------------------------------------------------------------------

    def snapshot(self) -> FleetSnapshot:
        """The fleet as the scheduler would see it from agents' reports, now."""
        agents = tuple(
            AgentView(
                agent_id=m.machine_id,
                pool=m.pool,
                provider=m.provider,
                region=m.region,
                residency_group=m.residency_label,
                connected=True,
                gpus_total=m.gpus,
                free_gpus=tuple(m.free_gpus),
                instance_type=m.instance_type,
                usd_per_hour=m.usd_per_hour,
                key=m.machine_id if m.rented else "",
            )
            for m in self.machines.values()
            if m.terminated_at is None and m.registered_at <= self.now
        )
        replicas = []
        for r in self._active:
            stats = r.model.stats(self.now)
            replicas.append(
                ReplicaView(
                    r.replica_id,
                    self.deployment,
                    r.machine.machine_id,
                    r.state,
                    stats.running,
                    stats.queued,
                    stats.token_usage,
                    stats.gen_throughput,
                )
            )
        return FleetSnapshot(
            agents, tuple(replicas), {self.deployment: self.gateway.load(self.now)}
        )

    def rented_machines_now(self) -> int:
        return sum(
            1
            for m in self.machines.values()
            if m.rented and m.launched_at <= self.now and m.terminated_at is None
        )

    def qps(self, window_s: float) -> float:
        horizon = self.now - window_s
        seen = self.arrivals_seen
        while seen and seen[0] <= horizon:
            seen.popleft()
        return len(seen) / window_s

    # -- the clock -----------------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, action))

    def run(self, controller: Controller) -> None:
        """Play every request of the trace; tick ``controller`` until the trace ends."""

        def decide() -> None:
            self._advance_all()
            self._finish_drains()
            controller.tick(self, self.now)
            self.ticks.append(
                TickSample(
                    self.now,
                    sum(1 for r in self._serving if not r.spilled),
                    sum(1 for r in self._serving if r.spilled),
                    self.rented_machines_now(),
                    self.signal,
                )
            )

        def tick() -> None:
            decide()
            following = self.now + controller.interval_s
            if following <= self.horizon:
                self.at(following, tick)

        self._decide_now = decide
        self.at(0.0, tick)
        arrivals = self.trace.arrivals
        index, total = 0, len(arrivals)
        queue = self._queue
        while index < total or queue:
            next_arrival = arrivals[index] if index < total else math.inf
            if queue and queue[0][0] <= next_arrival:
                when, _, action = heapq.heappop(queue)
                self.now = when
                action()
                continue
            self.now = next_arrival
            self._arrive(index)
            index += 1
        self.now = max(self.now, self.horizon)
        for replica in self.replicas.values():
            self._collect(replica, replica.model.advance(math.inf))
        self._finish_drains(final=True)
        for request in self.gateway.queue:
            self._reject(request, "no replica came up before the end of the trace")
        self.gateway.queue.clear()

    # -- internals -----------------------------------------------------------------------------

    def _arrive(self, request: int) -> None:
        self.arrivals_seen.append(self.now)
        self._advance_all()
        self.gateway.arrive(request)
        if self._release_controllers:
            self._finish_drains()

    def _submit(self, replica: Replica, request: int) -> bool:
        try:
            replica.model.submit(
                str(request),
                self.trace.input_tokens[request],
                self.trace.output_tokens[request],
                self.now,
            )
        except RequestRejected as exc:
            self._reject(request, _why(str(exc)))
            return False
        self.outcome[request] = SPILLED if replica.spilled else RESERVED
        replica.served += 1
        return True

    def _managed_done(self, request: int, ttft: float, e2e: float) -> None:
        self.outcome[request] = MANAGED
        self.ttft[request] = ttft
        self.e2e[request] = e2e
        if ttft > self.settings.ttft_slo_s:
            self._missed()

    def _reject(self, request: int, reason: str) -> None:
        self.outcome[request] = REJECTED
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        self._missed()

    def _missed(self) -> None:
        self.misses += 1
        if self.miss_budget is not None and self.misses > self.miss_budget:
            raise TooManyMisses(f"{self.misses} requests missed the TTFT target by {self.now:.0f}s")

    def _advance_all(self) -> None:
        now = self.now
        for replica in self._active:
            updates = replica.model.advance(now)
            if updates:
                self._collect(replica, updates)

    def _collect(self, replica: Replica, updates: list[Progress]) -> None:
        arrivals = self.trace.arrivals
        for p in updates:
            if p.generated == 1:  # its first token
                self.gateway.first_token(replica, int(p.request_id), p.at)
            if not p.finished:
                continue
            index = int(p.request_id)
            arrived = arrivals[index]
            assert p.first_token_at is not None
            self.ttft[index] = p.first_token_at - arrived
            self.e2e[index] = p.at - arrived
            if p.first_token_at - arrived > self.settings.ttft_slo_s:
                self._missed()
            if p.at > replica.last_finish_at:
                replica.last_finish_at = p.at

    def _finish_drains(self, final: bool = False) -> None:
        for replica in [r for r in self._active if r.state is ReplicaState.DRAINING]:
            if replica.model.in_flight and not final:
                continue
            assert replica.drain_started_at is not None
            stopped = max(replica.drain_started_at, replica.last_finish_at)
            replica.state = ReplicaState.STOPPED
            self._active.remove(replica)
            machine = replica.machine
            machine.free_gpus = sorted({*machine.free_gpus, *replica.gpu_indices})
            if machine.rented:
                machine.terminated_at = stopped
                why = "no warm pool"
                if self.warm_pool is not None and not final:
                    why = self.warm_pool.stop(
                        machine.machine_id,
                        machine.provider,
                        machine.instance_type,
                        machine.region,
                        machine.usd_per_hour,
                        stopped,
                    )
                if why:
                    self._event("terminated", replica.replica_id, f"{_where(machine)} given back")
                else:
                    self._event("stopped", replica.replica_id, f"{_where(machine)} kept stopped")
            controller = self._release_controllers.pop(replica.replica_id, None)
            if controller is not None and not final:
                controller.release_finished(replica.replica_id, self.now)

    def _event(self, kind: str, replica_id: str, text: str) -> None:
        self.events.append(Event(self.now, kind, replica_id, text))


def _why(message: str) -> str:
    """A rejection's reason without the numbers of one request, to count them together."""
    if "context length" in message:
        return "longer than the context length"
    if "KV pool" in message:
        return "larger than the KV pool"
    if "at least 1 token" in message:
        return "no prompt or nothing to generate"
    return message


def _where(machine: Machine) -> str:
    if machine.rented:
        return f"{machine.provider} {machine.instance_type} in {machine.region}"
    return f"reserved {machine.machine_id}"
