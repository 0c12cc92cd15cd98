"""The simulated gateway of one deployment: routing by the gateway's own function, managed
endpoints, and the bounded queue.

Every routing attempt calls :func:`decisions.routing.route`, the function the live gateway
calls, over the same kind of view (:class:`~decisions.routing.Target`: tier, residency labels,
cap, in-flight count, whether it accepts), inside the deployment's residency lock. As in the
live gateway (``gateway.targets.DeploymentState.try_acquire`` and ``gateway.queue.WaitQueue``):

- a request is routed once when it arrives; when nothing has room it waits in a FIFO queue of
  at most ``gateway.queue_size`` requests (a request that finds it full is refused, counted as
  rejected) for at most ``gateway.queue_timeout_s`` (then refused, rejected too);
- whenever capacity may have appeared (a replica became healthy, a managed request ended, a
  poll while anyone waits), the waiters re-run routing in order, and the first that gets
  nothing stops the pass, so nobody overtakes the head of the queue;
- a replica's cap is the smaller of ``gateway.max_concurrency_per_replica`` and its own
  ``max_running_requests``, and a replica that just became healthy is filled over
  ``gateway.warmup_s`` (the gateway's warm-up formula);
- with ``gateway.admission.adaptive`` (the default), each replica also has the live gateway's
  :class:`~decisions.admission.AdaptiveLimit` under that cap, fed with each request's time to
  first token (from being sent to the replica to its first token, which the cluster reports
  through :meth:`SimGateway.first_token`) and with the age of the oldest request still waiting
  for one;
- requests carry no affinity key (the traces have no sessions), so replicas are chosen by
  fewest in flight, as ``route()`` does without a key.

A managed endpoint is modelled by what the policy says of it and one assumption: its time to
first token is what one of our idle replicas takes to prefill the prompt, plus its
``added_latency_s``; it then streams at ``managed_output_tokens_per_s`` (settings); it holds at
most ``max_concurrency`` requests and bills each request's tokens at its list prices.

What the gateway reports to the scheduler is reported here too, into the snapshot's
:class:`~decisions.fleetview.GatewayLoad`: queue depth, the oldest waiter's age, the overflow
tokens per second sent to managed endpoints since the last report, and in-flight counts.

No decision of its own: the choice of target is ``route()``'s.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.runtimes.simulated_model import GpuProfile
from decisions.admission import AdaptiveLimit, settings_for
from decisions.endpoints import GatewayRouting, ManagedEndpoint
from decisions.fleetview import GatewayLoad
from decisions.policy import Lock
from decisions.routing import Queued, Request, Target, Tier, route

#: ``Outcome`` codes per request.
RESERVED, SPILLED, REJECTED, MANAGED = 0, 1, 2, 3
SERVED = (RESERVED, SPILLED, MANAGED)
_NO_KEY = Request()


class RoutableReplica(Protocol):
    """What the gateway reads of a simulated replica."""

    replica_id: str
    tier: Tier
    residency_group: str
    cloud: str
    region: str
    cap: int
    healthy_since: float

    @property
    def in_flight(self) -> int: ...


@dataclass(slots=True, eq=False)
class ManagedTarget:
    """One managed endpoint in the simulation: its in-flight count and what it was sent."""

    endpoint: ManagedEndpoint
    in_flight: int = 0
    served: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def view(self) -> Target:
        e = self.endpoint
        return Target(
            e.name,
            Tier.MANAGED,
            e.residency_group,
            in_flight=self.in_flight,
            cap=e.max_concurrency,
            usd_per_million_tokens=e.usd_per_million_output_tokens,
        )


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Callbacks into the world the gateway routes for."""

    now: Callable[[], float]
    #: Healthy replicas, in the order the fleet lists them.
    replicas: Callable[[], Sequence[RoutableReplica]]
    #: Give request ``index`` to a replica; False when the replica refuses it for good.
    submit: Callable[[RoutableReplica, int], bool]
    #: Request ``index`` was served by a managed endpoint with these times (from arrival).
    managed_done: Callable[[int, float, float], None]
    reject: Callable[[int, str], None]
    #: Run an action at a time.
    at: Callable[[float, Callable[[], None]], None]
    #: Bring every replica up to now (their in-flight counts, finished requests).
    refresh: Callable[[], None]


class SimGateway:
    """Routes a deployment's requests: replicas by tier, then managed endpoints, then a queue."""

    def __init__(
        self,
        lock: Lock,
        routing: GatewayRouting,
        managed: Sequence[ManagedEndpoint],
        profile: GpuProfile,
        input_tokens: Sequence[int],
        output_tokens: Sequence[int],
        arrivals: Sequence[float],
        dispatch: Dispatch,
        *,
        managed_output_tokens_per_s: float,
        poll_s: float,
        ttft_s: float = 2.0,
    ) -> None:
        self.lock = lock
        self.routing = routing
        self.managed = [ManagedTarget(e) for e in managed]
        self._by_name = {m.endpoint.name: m for m in self.managed}
        self.profile = profile
        self._in = input_tokens
        self._out = output_tokens
        self._arrivals = arrivals
        self.d = dispatch
        self.managed_tps = managed_output_tokens_per_s
        self.poll_s = poll_s
        self.queue: deque[int] = deque()
        self._poll_due = False
        #: Every call of ``route()``: one per routing attempt, as in the live gateway.
        self.route_calls = 0
        self.queued = 0
        self.timeouts = 0
        self.queue_full = 0
        self.peak_queue = 0
        self._overflow_tokens = 0
        self._overflow_since = 0.0
        #: (when, USD, tokens) of every request sent to a managed endpoint.
        self.spend: list[tuple[float, float, int]] = []
        #: None: the static cap only (``gateway.admission.adaptive: false``).
        self.admission = settings_for(routing.admission, ttft_s)
        #: Per replica: its adaptive limit, and its requests waiting for a first token (request
        #: index -> when it was sent; insertion order is sending order, so the first is oldest).
        self.limits: dict[str, AdaptiveLimit] = {}
        self.waiting_first: dict[str, dict[int, float]] = {}
        #: Samples fed to the limiters (first tokens seen).
        self.samples = 0

    # -- the view ----------------------------------------------------------------------------

    def targets(self, now: float) -> list[Target]:
        warmup = self.routing.warmup_s
        out: list[Target] = []
        for r in self.d.replicas():
            cap = r.cap
            if self.admission is not None:
                cap = self._adaptive_cap(r, now)
            age = now - r.healthy_since
            if warmup > 0 and age < warmup:
                cap = min(cap, 1 + int((cap - 1) * max(0.0, age) / warmup))
            out.append(
                Target(r.replica_id, r.tier, r.residency_group, r.cloud, r.region, r.in_flight, cap)
            )
        out.extend(m.view() for m in self.managed)
        return out

    def _adaptive_cap(self, replica: RoutableReplica, now: float) -> int:
        rid = replica.replica_id
        limit = self.limits.get(rid)
        if limit is None:
            assert self.admission is not None
            limit = self.limits[rid] = AdaptiveLimit(self.admission, replica.cap, now)
        waiting = self.waiting_first.get(rid)
        oldest = now - next(iter(waiting.values())) if waiting else 0.0
        return limit.cap(now, replica.in_flight, oldest)

    def first_token(self, replica: RoutableReplica, index: int, at: float) -> None:
        """Request ``index`` got its first token from ``replica`` at ``at``."""
        waiting = self.waiting_first.get(replica.replica_id)
        sent = waiting.pop(index, None) if waiting else None
        limit = self.limits.get(replica.replica_id)
        if sent is None or limit is None:
            return
        self.samples += 1
        limit.sample(at - sent, at, replica.in_flight)

    # -- requests ----------------------------------------------------------------------------

    def arrive(self, index: int) -> None:
        """A new request: the waiters go first (capacity freed since the last pass is theirs),
        then it is routed once, as the live gateway routes every request once on arrival;
        with nothing for it, it queues."""
        if self.queue:
            self.pump()
        if not self._attempt(index):
            self._enqueue(index)

    def pump(self) -> None:
        """Waiters, oldest first, re-run routing; the first that gets nothing stops the pass."""
        now = self.d.now()
        queue = self.queue
        timeout = self.routing.queue_timeout_s
        while queue:
            head = queue[0]
            if now >= self._arrivals[head] + timeout:
                queue.popleft()
                self.timeouts += 1
                self.d.reject(head, f"waited {timeout:g}s in the gateway queue (503)")
                continue
            if not self._attempt(head):
                break
            queue.popleft()
        if queue:
            self._schedule_poll()

    def _enqueue(self, index: int) -> None:
        if len(self.queue) >= self.routing.queue_size:
            self.queue_full += 1
            self.d.reject(index, "the gateway queue was full (429)")
            return
        self.queue.append(index)
        self.queued += 1
        self.peak_queue = max(self.peak_queue, len(self.queue))
        self._schedule_poll()

    def _schedule_poll(self) -> None:
        if self._poll_due:
            return
        self._poll_due = True
        now = self.d.now()
        head_deadline = self._arrivals[self.queue[0]] + self.routing.queue_timeout_s
        self.d.at(min(now + self.poll_s, max(now, head_deadline)), self._poll)

    def _poll(self) -> None:
        self._poll_due = False
        self.d.refresh()
        self.pump()

    def _attempt(self, index: int) -> bool:
        """Route ``index`` once; True when it went somewhere (or was refused for good)."""
        now = self.d.now()
        self.route_calls += 1
        decision = route(
            self.targets(now), self.lock, _NO_KEY, max_load_factor=self.routing.max_load_factor
        )
        if isinstance(decision, Queued):
            return False
        target = decision.target
        if target.tier is Tier.MANAGED:
            self._to_managed(self._by_name[target.target_id], index, now)
            return True
        for replica in self.d.replicas():
            if replica.replica_id == target.target_id:
                if self.d.submit(replica, index) and self.admission is not None:
                    rid = replica.replica_id
                    self.waiting_first.setdefault(rid, {})[index] = now
                    limit = self.limits.get(rid)
                    if limit is not None:
                        limit.sent(now)
                return True
        raise AssertionError(f"route() chose {target.target_id}, which is not a target")

    def _to_managed(self, m: ManagedTarget, index: int, now: float) -> None:
        e = m.endpoint
        prompt, new = self._in[index], self._out[index]
        if prompt < 1 or new < 1:
            self.d.reject(index, "no prompt or nothing to generate")
            return
        m.in_flight += 1
        m.served += 1
        m.input_tokens += prompt
        m.output_tokens += new
        usd = e.cost_usd(prompt, new)
        m.cost_usd += usd
        self.spend.append((now, usd, prompt + new))
        self._overflow_tokens += prompt + new
        p = self.profile
        first = p.prefill_step_s + prompt / p.prefill_tokens_per_s + e.added_latency_s
        done = first + max(0, new - 1) / self.managed_tps
        waited = now - self._arrivals[index]

        def finished() -> None:
            m.in_flight -= 1
            self.d.managed_done(index, waited + first, waited + done)
            if self.queue:
                self.d.refresh()
                self.pump()

        self.d.at(now + done, finished)

    # -- what the gateway reports --------------------------------------------------------------

    def load(self, now: float) -> GatewayLoad:
        """What a gateway reports now (overflow since the previous report)."""
        elapsed = now - self._overflow_since
        rate = self._overflow_tokens / elapsed if elapsed > 0 else 0.0
        if elapsed > 0:
            self._overflow_tokens = 0
            self._overflow_since = now
        oldest = now - self._arrivals[self.queue[0]] if self.queue else 0.0
        in_flight = {r.replica_id: r.in_flight for r in self.d.replicas() if r.in_flight}
        in_flight.update({m.endpoint.name: m.in_flight for m in self.managed if m.in_flight})
        return GatewayLoad(
            queue_depth=len(self.queue),
            oldest_queued_s=max(0.0, oldest),
            overflow_tokens_per_s=rate,
            in_flight=in_flight,
            gateways=1,
        )

    @property
    def managed_cost_usd(self) -> float:
        return math.fsum(m.cost_usd for m in self.managed)
