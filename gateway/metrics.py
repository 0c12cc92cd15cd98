"""The gateway's Prometheus metrics, served at ``GET /metrics`` on the gateway's own port.

One registry per gateway (tests run several in one process). Labelled children are looked up
once and kept, since ``labels()`` takes a lock and builds a tuple on every call and this is the
request path. Names start with ``spillway_gateway_``; the tier label is ``reserved``, ``rented``
or ``managed``.

``spillway_gateway_residency_refusals_total`` must stay 0: it counts targets that routing chose
and that then failed the gateway's own residency re-check (which refuses them). Anything else
there is a bug in :mod:`decisions.routing`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    exposition,
    generate_latest,
)

TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST


class _Family:
    """A metric and its children by label values, cached."""

    __slots__ = ("_children", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        return child

    def remove(self, *labels: str) -> None:
        if self._children.pop(labels, None) is not None:
            self.metric.remove(*labels)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "spillway_gateway_"
        self.requests = _Family(
            Counter(
                p + "requests",
                "Requests answered, by deployment, tier and HTTP status (tier 'none': refused "
                "or failed before any target).",
                ["deployment", "tier", "code"],
                registry=r,
            )
        )
        self.errors = _Family(
            Counter(
                p + "errors",
                "Upstream failures: connect (connection refused or reset before an answer), "
                "status_5xx, mid_stream (after the first byte reached the client), "
                "bad_request, internal.",
                ["deployment", "kind"],
                registry=r,
            )
        )
        self.retries = _Family(
            Counter(
                p + "retries",
                "Requests sent to a second target after the first failed before its first byte.",
                ["deployment"],
                registry=r,
            )
        )
        self.ttfb = _Family(
            Histogram(
                p + "time_to_first_byte_seconds",
                "From the request's arrival (queue wait included) to the first byte sent back.",
                ["deployment", "tier"],
                buckets=TTFB_BUCKETS,
                registry=r,
            )
        )
        self.in_flight = _Family(
            Gauge(p + "in_flight", "Requests in flight.", ["deployment", "tier"], registry=r)
        )
        self.concurrency_limit = _Family(
            Gauge(
                p + "replica_concurrency_limit",
                "Requests a replica may have in flight now: its adaptive limit (from its time "
                "to first token against the deployment's target), or its static cap without "
                "adaptive admission.",
                ["deployment", "replica"],
                registry=r,
            )
        )
        self.queue_depth = _Family(
            Gauge(p + "queue_depth", "Requests waiting in the queue.", ["deployment"], registry=r)
        )
        self.queue_wait = _Family(
            Histogram(
                p + "queue_wait_seconds",
                "Time spent in the queue, granted or not.",
                ["deployment"],
                buckets=WAIT_BUCKETS,
                registry=r,
            )
        )
        self.queue_timeouts = _Family(
            Counter(
                p + "queue_timeouts",
                "Requests refused after waiting the whole queue timeout.",
                ["deployment"],
                registry=r,
            )
        )
        self.refusals = _Family(
            Counter(
                p + "refusals",
                "Requests refused, by reason: queue_full, shed, queue_timeout, "
                "no_target (e.g. /generate with only managed endpoints), draining_gateway.",
                ["deployment", "reason"],
                registry=r,
            )
        )
        self.tokens = _Family(
            Counter(
                p + "tokens",
                "Tokens by tier and direction (input, output), from the responses' usage "
                "(estimated from bytes when a stream carries none).",
                ["deployment", "tier", "direction"],
                registry=r,
            )
        )
        self.overflow_tokens = _Family(
            Counter(
                p + "overflow_tokens",
                "Tokens (input and output) sent to a managed endpoint.",
                ["deployment", "endpoint"],
                registry=r,
            )
        )
        self.residency_refusals = _Family(
            Counter(
                p + "residency_refusals",
                "Targets chosen by routing that failed the residency re-check (must stay 0).",
                ["deployment"],
                registry=r,
            )
        )
        self.fleet_connected = Gauge(
            p + "fleet_connected", "1 while the fleet watch is open.", registry=r
        )
        self.fleet_replicas = Gauge(
            p + "fleet_replicas", "Replicas in the fleet in force.", registry=r
        )
        self.replicas_down = Gauge(
            p + "replicas_down",
            "Replicas the gateway's own health checks hold back (connection refused).",
            registry=r,
        )
        self.policy_rejected = Counter(
            p + "policy_rejected", "Policy edits refused (the old policy stayed).", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
