"""From the policy and the fleet to routing targets, and the counting around each request.

A :class:`Slot` is one target's live state as the gateway keeps it: where it answers, its tier
and residency labels, its cap, how many requests the gateway has in flight there, whether the
gateway's own health check holds it back. A :class:`DeploymentState` holds one deployment's
slots (its replicas from the fleet, its managed endpoints from the policy), its lock, its queue
and its traffic totals; :meth:`DeploymentState.try_acquire` builds the immutable
:class:`~decisions.routing.Target` view, calls :func:`~decisions.routing.route` and takes the
chosen slot. :class:`Deployments` maps names, model names and path prefixes to deployments and
applies policy reloads and fleet changes; :class:`PolicyFile` reloads the policy file.

Adaptive admission (``gateway.admission.adaptive``, the default): each replica's slot keeps a
:class:`~decisions.admission.AdaptiveLimit` under its static cap, and routing sees that limit as
the replica's cap, so a replica whose time to first token nears ``slo.ttft_s`` counts as full
and the next request overflows. The proxy feeds it: :meth:`Slot.sent` when a request goes out,
:meth:`Slot.first_byte` at the first chunk of a streamed answer's body (SGLang writes it with
the first token) with the time since sending, :meth:`Slot.answered` for an answer read whole
(its full time is only an upper bound of its time to first token: it counts as a fast sample
when within the threshold and as nothing otherwise), :meth:`Slot.settled` for a failure. Only
streamed requests are watched for a first token that is late: the oldest one still waiting
past the threshold counts as a slow sample before it arrives.

Warm-up: a replica that became healthy ``t`` seconds ago (``t < warmup_s``) takes at most
``1 + (cap - 1) * t / warmup_s`` requests (``cap`` the adaptive limit when there is one).
Replicas already healthy in the first fleet the gateway ever sees are taken as warm (a gateway
restart must not throttle a running fleet).

Nothing here chooses a target: that is ``route()``'s, and the residency re-check after it only
refuses. No HTTP here.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from yarl import URL

from common.configfile import ConfigError
from decisions.admission import AdaptiveLimit, AdmissionSettings, settings_for
from decisions.endpoints import GatewayRouting, ManagedEndpoint
from decisions.policy import Deployment, Lock, Policy, resolve_lock
from decisions.policycheck import load_policy
from decisions.routing import Queued, Request, Target, Tier, inside_lock, route
from gateway.fleet import DeploymentTraffic, FleetView, RoutableReplica, TierTotals
from gateway.metrics import GatewayMetrics
from gateway.queue import Refused, WaitQueue
from providers.catalog import Catalog, default_catalog

log = logging.getLogger(__name__)

DEFAULT_CAP = 256
#: Request kinds and the path each is sent to.
CHAT, COMPLETIONS, GENERATE = "chat", "completions", "generate"
REPLICA_PATHS = {
    CHAT: "/v1/chat/completions",
    COMPLETIONS: "/v1/completions",
    GENERATE: "/generate",
}
MANAGED_PATHS = {CHAT: "/chat/completions", COMPLETIONS: "/completions"}
TIERS = tuple(Tier)
_LABELS = {tier: tier.label for tier in Tier}


class Slot:
    """One replica or managed endpoint of a deployment, with the gateway's count on it."""

    __slots__ = (
        "base",
        "base_cap",
        "cloud",
        "down",
        "gone",
        "headers",
        "healthy",
        "healthy_since",
        "in_flight",
        "limiter",
        "managed",
        "model",
        "owner",
        "pool",
        "price",
        "region",
        "residency_group",
        "target_id",
        "tier",
        "tier_label",
        "urls",
        "view",
        "waiting_first",
    )

    def __init__(self, owner: DeploymentState, target_id: str, tier: Tier) -> None:
        self.owner = owner
        self.target_id = target_id
        self.tier = tier
        self.tier_label = _LABELS[tier]
        #: The last Target built, reused while nothing in it changed (most slots, most
        #: requests: one request moves one slot's count).
        self.view: Target | None = None
        self.managed = tier is Tier.MANAGED
        self.residency_group = ""
        self.pool = ""
        self.cloud = ""
        self.region = ""
        #: Where it answers (a replica: http://host:port), and the URL per request kind.
        self.base = ""
        self.in_flight = 0
        self.base_cap = 1
        #: Managed endpoints: list price of a million output tokens (route() picks the cheapest).
        self.price = 0.0
        self.healthy = False
        self.healthy_since = -math.inf
        #: Held back by the gateway's own health check until a probe passes.
        self.down = False
        #: Left the fleet or the policy; kept only while requests are in flight.
        self.gone = False
        self.urls: dict[str, URL] = {}
        self.headers: dict[str, str] = {}
        #: A managed endpoint's own name for the model (the body is rewritten for it).
        self.model: str | None = None
        #: Replicas with adaptive admission: the limit, and the streamed requests still waiting
        #: for their first byte (request token -> when sent; the first entry is the oldest).
        self.limiter: AdaptiveLimit | None = None
        self.waiting_first: dict[int, float] = {}

    def set_tier(self, tier: Tier) -> None:
        if tier is not self.tier:
            self.tier = tier
            self.tier_label = _LABELS[tier]
            self.view = None

    def cap_at(self, now: float, warmup_s: float) -> int:
        cap = self.base_cap
        limiter = self.limiter
        if limiter is not None:
            waiting = self.waiting_first
            oldest = now - next(iter(waiting.values())) if waiting else 0.0
            cap = min(cap, limiter.cap(now, self.in_flight, oldest))
        age = now - self.healthy_since
        if warmup_s > 0 and age < warmup_s:
            cap = min(cap, 1 + int((cap - 1) * max(0.0, age) / warmup_s))
        return cap

    def target(self, now: float, warmup_s: float) -> Target:
        cap = self.cap_at(now, warmup_s) if not self.managed else self.base_cap
        accepting = self.healthy and not self.down and not self.gone
        view = self.view
        if (
            view is not None
            and view.in_flight == self.in_flight
            and view.cap == cap
            and view.accepting is accepting
        ):
            return view
        view = self.view = Target(
            self.target_id,
            self.tier,
            self.residency_group,
            self.cloud,
            self.region,
            self.in_flight,
            cap,
            accepting,
            self.price,
        )
        return view

    # -- adaptive admission: what the proxy tells the limiter -----------------------------------

    def sent(self, token: int, now: float, streamed: bool) -> None:
        """Request ``token`` was sent at ``now``; a streamed one is watched for its first byte."""
        if self.limiter is not None:
            self.limiter.sent(now)
            if streamed:
                self.waiting_first[token] = now

    def first_byte(self, token: int, ttft_s: float, now: float) -> None:
        """The first chunk of a streamed answer's body came ``ttft_s`` after sending."""
        self.waiting_first.pop(token, None)
        if self.limiter is not None:
            self.limiter.sample(ttft_s, now, self.in_flight)

    def answered(self, token: int, elapsed_s: float, now: float) -> None:
        """An answer read whole, ``elapsed_s`` after sending: an upper bound of its time to
        first token, so a fast sample when within the threshold and nothing otherwise."""
        self.waiting_first.pop(token, None)
        limiter = self.limiter
        if limiter is not None and elapsed_s <= limiter.settings.threshold_s:
            limiter.sample(elapsed_s, now, self.in_flight)

    def settled(self, token: int) -> None:
        """Request ``token`` failed or was abandoned: no sample."""
        self.waiting_first.pop(token, None)

    def current_limit(self) -> float:
        return float(int(self.limiter.limit)) if self.limiter is not None else float(self.base_cap)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class Homes:
    """Which replica served each affinity key last, for the newest ``size`` keys.

    That replica holds the conversation's KV cache: routing sends the key back there while the
    load bound allows, so one detour under load does not move a conversation for good.
    """

    def __init__(self, size: int = 65_536) -> None:
        self.size = size
        self._homes: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        return self._homes.get(key)

    def remember(self, key: str, target_id: str) -> None:
        self._homes[key] = target_id
        self._homes.move_to_end(key)
        if len(self._homes) > self.size:
            self._homes.popitem(last=False)

    def __len__(self) -> int:
        return len(self._homes)


class DeploymentState:
    """One deployment: its slots, lock, queue and traffic totals."""

    def __init__(self, name: str, metrics: GatewayMetrics, replica_headers: dict[str, str]) -> None:
        self.name = name
        self.metrics = metrics
        self.replica_headers = replica_headers
        self.spec: Deployment | None = None
        self.routing = GatewayRouting()
        self.admission: AdmissionSettings | None = None
        self.lock = Lock(None, None, None)
        self.replicas: dict[str, Slot] = {}
        self.managed: dict[str, Slot] = {}
        self.lingering: dict[int, Slot] = {}
        self.homes = Homes()
        self.queue: WaitQueue[Slot] = WaitQueue(
            self.routing.queue_size,
            self.routing.queue_timeout_s,
            self.release,
            depth=metrics.queue_depth(name),
            waited=metrics.queue_wait(name),
        )
        self.totals = [TierTotals() for _ in TIERS]
        self.refused = 0
        self.overflow_tokens = 0
        self.overflow_since = time.monotonic()
        self._pools: frozenset[str] = frozenset()
        for tier in TIERS:
            metrics.in_flight(name, tier.label).set_function(self._in_flight_of(tier))
        self._residency = metrics.residency_refusals(name)

    # -- configuration ----------------------------------------------------------------------

    def configure(self, spec: Deployment, lock: Lock) -> None:
        self.spec = spec
        self.lock = lock
        self.routing = spec.gateway
        self.admission = settings_for(spec.gateway.admission, spec.slo.ttft_s)
        self.queue.size = spec.gateway.queue_size
        self.queue.timeout_s = spec.gateway.queue_timeout_s
        managed: dict[str, Slot] = {}
        for endpoint in spec.managed:
            slot = self.managed.pop(endpoint.name, None) or Slot(self, endpoint.name, Tier.MANAGED)
            _configure_managed(slot, endpoint)
            managed[endpoint.name] = slot
        for slot in self.managed.values():
            self._retire(slot)
        self.managed = managed
        self._pools = frozenset(spec.pools)
        for slot in self.replicas.values():
            slot.set_tier(Tier.RESERVED if slot.pool in self._pools else Tier.RENTED)

    def update_replica(self, replica: RoutableReplica, healthy_since: float) -> None:
        slot = self.replicas.get(replica.replica_id)
        tier = Tier.RESERVED if replica.pool in self._pools else Tier.RENTED
        if slot is None:
            slot = self._revive(replica.replica_id) or Slot(self, replica.replica_id, tier)
            self.replicas[replica.replica_id] = slot
        slot.set_tier(tier)
        slot.pool = replica.pool
        slot.residency_group = replica.residency_group
        slot.cloud = replica.provider
        slot.region = replica.region
        slot.view = None
        slot.healthy = replica.state == "healthy" and bool(replica.host) and replica.port > 0
        slot.healthy_since = healthy_since
        caps = [c for c in (self.routing.max_concurrency_per_replica,) if c]
        if replica.max_running_requests > 0:
            caps.append(replica.max_running_requests)
        slot.base_cap = min(caps) if caps else DEFAULT_CAP
        self._admission(slot)
        base = f"http://{_host(replica.host)}:{replica.port}"
        if slot.base != base:
            slot.base = base
            slot.urls = {kind: URL(base + path) for kind, path in REPLICA_PATHS.items()}
            slot.urls["health"] = URL(base + "/health")
            slot.down = False
        slot.headers = self.replica_headers

    def _admission(self, slot: Slot) -> None:
        """Give a replica's slot the deployment's limiter (a new one when the settings changed;
        the same one, under its new cap, otherwise)."""
        settings = self.admission
        limiter = slot.limiter
        if settings is None:
            slot.limiter = None
            slot.waiting_first.clear()
        elif limiter is None or limiter.settings != settings:
            slot.limiter = AdaptiveLimit(settings, slot.base_cap, time.monotonic())
        else:
            limiter.set_max(slot.base_cap)
        self.metrics.concurrency_limit(self.name, slot.target_id).set_function(slot.current_limit)

    def drop_replicas(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for replica_id in [r for r in self.replicas if r not in keep]:
            self._retire(self.replicas.pop(replica_id))
            self.metrics.concurrency_limit.remove(self.name, replica_id)

    def _revive(self, target_id: str) -> Slot | None:
        """A replica back in the fleet while requests from before are still in flight."""
        for key, slot in self.lingering.items():
            if slot.target_id == target_id and not slot.managed:
                del self.lingering[key]
                slot.gone = False
                return slot
        return None

    def _retire(self, slot: Slot) -> None:
        slot.gone = True
        if slot.in_flight:
            self.lingering[id(slot)] = slot

    # -- routing ------------------------------------------------------------------------------

    def targets(self, now: float, with_managed: bool) -> list[Target]:
        warmup = self.routing.warmup_s
        out = [slot.target(now, warmup) for slot in self.replicas.values()]
        if with_managed:
            out += [slot.target(now, warmup) for slot in self.managed.values()]
        return out

    def slot_of(self, target_id: str, managed: bool) -> Slot | None:
        return (self.managed if managed else self.replicas).get(target_id)

    def try_acquire(
        self, key: str | None, exclude: frozenset[str], with_managed: bool
    ) -> Slot | Queued:
        """Route once; on a target, count the request on its slot and return the slot.

        ``key`` is the request's affinity key; the replica it lands on becomes the key's home.
        """
        home = self.homes.get(key) if key is not None else None
        decision = route(
            self.targets(time.monotonic(), with_managed),
            self.lock,
            Request(key, exclude, home),
            max_load_factor=self.routing.max_load_factor,
        )
        if isinstance(decision, Queued):
            return decision
        target = decision.target
        if not inside_lock(target, self.lock):  # defensive: route() never does this
            self._residency.inc()
            log.error("routing chose %s outside the lock of %s; refused", target, self.name)
            return Queued("residency re-check refused the chosen target")
        slot = self.slot_of(target.target_id, target.tier is Tier.MANAGED)
        if slot is None:
            return Queued("the chosen target is gone")
        slot.in_flight += 1
        if key is not None and target.tier is not Tier.MANAGED:
            self.homes.remember(key, target.target_id)
        return slot

    def grant(self, key: str | None, exclude: frozenset[str], with_managed: bool) -> Slot | None:
        result = self.try_acquire(key, exclude, with_managed)
        return None if isinstance(result, Queued) else result

    def release(self, slot: Slot) -> None:
        slot.in_flight -= 1
        if slot.gone and slot.in_flight <= 0:
            self.lingering.pop(id(slot), None)
        self.queue.pump()

    def _in_flight_of(self, tier: Tier) -> Callable[[], float]:
        def count() -> float:
            slots = (*self.replicas.values(), *self.managed.values(), *self.lingering.values())
            return float(sum(s.in_flight for s in slots if s.tier is tier))

        return count

    # -- traffic ------------------------------------------------------------------------------

    def count(self, slot: Slot, input_tokens: int, output_tokens: int) -> None:
        totals = self.totals[slot.tier]
        totals.requests += 1
        totals.input_tokens += input_tokens
        totals.output_tokens += output_tokens
        m = self.metrics
        m.tokens(self.name, slot.tier_label, "input").inc(input_tokens)
        m.tokens(self.name, slot.tier_label, "output").inc(output_tokens)
        if slot.managed:
            self.overflow_tokens += input_tokens + output_tokens
            m.overflow_tokens(self.name, slot.target_id).inc(input_tokens + output_tokens)

    def traffic(self, now: float) -> DeploymentTraffic:
        slots = [*self.replicas.values(), *self.managed.values(), *self.lingering.values()]
        elapsed = max(now - self.overflow_since, 1e-3)
        rate = self.overflow_tokens / elapsed
        self.overflow_tokens = 0
        self.overflow_since = now
        return DeploymentTraffic(
            deployment=self.name,
            queue_depth=len(self.queue),
            oldest_queued_s=self.queue.oldest_s(now),
            in_flight={s.target_id: s.in_flight for s in slots if s.in_flight > 0},
            tiers={
                t.label: TierTotals(x.requests, x.input_tokens, x.output_tokens)
                for t, x in zip(TIERS, self.totals, strict=True)
            },
            overflow_tokens_per_s=rate,
            refused=self.refused,
        )


def _configure_managed(slot: Slot, endpoint: ManagedEndpoint) -> None:
    slot.gone = False
    slot.healthy = True
    slot.residency_group = endpoint.residency_group
    slot.base_cap = endpoint.max_concurrency
    slot.price = endpoint.usd_per_million_output_tokens
    slot.view = None
    slot.model = endpoint.model
    slot.urls = {kind: URL(endpoint.base_url + path) for kind, path in MANAGED_PATHS.items()}
    headers = {"Content-Type": "application/json"}
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        else:
            log.warning(
                "managed endpoint %s: environment variable %s is not set; sending no API key",
                endpoint.name,
                endpoint.api_key_env,
            )
    slot.headers = headers


class Deployments:
    """Every deployment of the policy in force, by name, model name and path prefix."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        replica_api_key: str | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.metrics = metrics
        self.catalog = catalog or default_catalog()
        headers = {"Content-Type": "application/json"}
        if replica_api_key:
            headers["Authorization"] = f"Bearer {replica_api_key}"
        self.replica_headers = headers
        self.by_name: dict[str, DeploymentState] = {}
        self.by_model: dict[str, DeploymentState] = {}
        self.by_prefix: dict[str, DeploymentState] = {}
        self.policy: Policy | None = None
        self.fleet = FleetView(self.apply_fleet)
        self._healthy_since: dict[str, float] = {}

    def apply_policy(self, policy: Policy) -> None:
        new: dict[str, DeploymentState] = {}
        for name, spec in policy.deployments.items():
            state = self.by_name.get(name) or DeploymentState(
                name, self.metrics, self.replica_headers
            )
            state.configure(spec, resolve_lock(policy, spec, self.catalog))
            new[name] = state
        for name, old in self.by_name.items():
            if name not in new:
                old.queue.refuse_all(
                    Refused(404, "removed", f"deployment {name} left the policy", 1)
                )
        self.by_name = new
        by_model: dict[str, DeploymentState] = dict(new)
        for state in new.values():
            assert state.spec is not None
            by_model.setdefault(state.spec.model, state)
        self.by_model = by_model
        self.by_prefix = {
            (state.routing.path_prefix or f"/{name}"): state for name, state in new.items()
        }
        self.policy = policy
        self.apply_fleet()

    def apply_fleet(self) -> None:
        now = time.monotonic()
        first = self.fleet.fleets_applied <= 1 and not self._healthy_since
        seen: dict[str, list[str]] = {}
        since: dict[str, float] = {}
        for replica in self.fleet.replicas.values():
            if replica.state == "healthy":
                since[replica.replica_id] = self._healthy_since.get(
                    replica.replica_id, -math.inf if first else now
                )
            state = self.by_name.get(replica.deployment)
            if state is None:
                continue
            state.update_replica(replica, since.get(replica.replica_id, -math.inf))
            seen.setdefault(replica.deployment, []).append(replica.replica_id)
        self._healthy_since = since
        for name, state in self.by_name.items():
            state.drop_replicas(seen.get(name, ()))
            state.queue.pump()
        self.metrics.fleet_replicas.set(len(self.fleet.replicas))

    def resolve(self, model: object) -> DeploymentState | None:
        if isinstance(model, str):
            return self.by_model.get(model)
        if model is None and len(self.by_name) == 1:
            return next(iter(self.by_name.values()))
        return None

    def pump_all(self) -> None:
        for state in self.by_name.values():
            if len(state.queue):
                state.queue.pump()

    def traffic(self) -> list[DeploymentTraffic]:
        now = time.monotonic()
        return [state.traffic(now) for state in self.by_name.values()]


class PolicyFile:
    """The policy file in force; :meth:`reload` swaps in a valid edit, keeps the old on a broken
    one (logged in one line)."""

    def __init__(self, path: Path, catalog: Catalog | None = None) -> None:
        self.path = path
        self.catalog = catalog
        self._stamp: tuple[int, int] | None = None
        self._seen = b""
        self.rejected = 0

    def load(self) -> Policy:
        """The valid policy; :class:`ConfigError` listing every problem otherwise."""
        data = self.path.read_bytes()
        policy = load_policy(self.path, self.catalog)
        self._seen = data
        self._stamp = self._stat()
        return policy

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload(self) -> Policy | None:
        """The new policy when the file changed to a valid one; None otherwise."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self.rejected += 1
            log.error("policy %s unreadable (%s); keeping the policy in force", self.path, exc)
            return None
        if data == self._seen:
            return None
        self._seen = data
        try:
            return load_policy(self.path, self.catalog)
        except ConfigError as exc:
            self.rejected += 1
            log.error(
                "policy %s refused, keeping the policy in force: %s",
                self.path,
                " | ".join(exc.problems),
            )
            return None
