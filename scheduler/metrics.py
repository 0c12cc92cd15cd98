"""Prometheus metrics for the scheduler, computed from fleet state when scraped.

Served by prometheus_client's own HTTP server on ``metrics_listen``. The collector reads fleet
state from that server's thread; it only takes snapshots (no mutation), which is safe under the
GIL because fleet state is only changed on the event loop.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from scheduler.fleet import AgentHealth, FleetState

if TYPE_CHECKING:
    from scheduler.auth import TokenStore
    from scheduler.policystore import PolicyStore


class DelayHistogram:
    """Seconds from a report's ``sent_at`` (the agent's clock) to its arrival in fleet state.

    Cumulative-bucket counts in the Prometheus style, kept by hand because this runs for every
    report and needs no lock: it is only written from the event loop.
    """

    BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, count of observations <= it), ending with +Inf."""
        out, running = [], 0
        for bound, count in zip((*map(str, self.BOUNDS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class ServiceStats(Protocol):
    """What the gRPC service counts for these metrics (``scheduler.server.SchedulerService``)."""

    @property
    def open_streams(self) -> int: ...
    @property
    def open_watches(self) -> int: ...
    @property
    def report_delay(self) -> DelayHistogram: ...
    @property
    def rejected(self) -> Mapping[str, int]: ...
    @property
    def policy_store(self) -> PolicyStore | None: ...
    @property
    def tokens(self) -> TokenStore: ...


class FleetCollector(Collector):
    def __init__(self, fleet: FleetState, service: ServiceStats) -> None:
        self._fleet = fleet
        self._service = service

    def collect(self) -> Iterator[Any]:
        agents = GaugeMetricFamily(
            "spillway_agents", "Agents known to the scheduler, by health.", labels=["health"]
        )
        counts = dict.fromkeys(AgentHealth, 0)
        for _, health in self._fleet.agents():
            counts[health] += 1
        for health, count in counts.items():
            agents.add_metric([health.value], count)
        yield agents
        yield GaugeMetricFamily(
            "spillway_report_streams_open",
            "Report streams currently open (agents connected right now).",
            value=self._service.open_streams,
        )
        yield GaugeMetricFamily(
            "spillway_fleet_watches_open",
            "Fleet watch streams currently open (gateways watching right now).",
            value=self._service.open_watches,
        )
        gateways = GaugeMetricFamily(
            "spillway_gateways", "Gateways heard from, by health.", labels=["health"]
        )
        gateway_counts = dict.fromkeys(AgentHealth, 0)
        for record in self._fleet.gateways():
            gateway_counts[self._fleet.gateway_health(record)] += 1
        for health, count in gateway_counts.items():
            gateways.add_metric([health.value], count)
        yield gateways
        yield CounterMetricFamily(
            "spillway_reports", "Capacity reports accepted.", value=self._fleet.reports_total
        )
        yield GaugeMetricFamily(
            "spillway_reports_per_second",
            f"Reports accepted per second over the last {self._fleet.RATE_WINDOW_S:.0f}s.",
            value=self._fleet.reports_per_second(),
        )
        free = GaugeMetricFamily(
            "spillway_gpus_free", "Free GPUs on connected agents, per pool.", labels=["pool"]
        )
        total = GaugeMetricFamily(
            "spillway_gpus_total", "GPUs on connected agents, per pool.", labels=["pool"]
        )
        for pool in self._fleet.pools():
            free.add_metric([pool.pool], pool.gpus_free)
            total.add_metric([pool.pool], pool.gpus_total)
        yield free
        yield total
        delay = self._service.report_delay
        yield HistogramMetricFamily(
            "spillway_report_delay_seconds",
            "From a report's sent_at (agent clock) until it is applied to fleet state.",
            buckets=delay.cumulative(),
            sum_value=delay.total,
        )
        rejected = CounterMetricFamily(
            "spillway_rejected_calls",
            "Calls refused, by gRPC status code (each one; the log is rate-limited).",
            labels=["code"],
        )
        for code, count in sorted(self._service.rejected.items()):
            rejected.add_metric([code], count)
        yield rejected
        tokens = self._service.tokens
        yield GaugeMetricFamily(
            "spillway_tokens", "Tokens in force (from the tokens file).", value=len(tokens)
        )
        yield GaugeMetricFamily(
            "spillway_tokens_edit_refused",
            "1 while the newest edit of the tokens file is refused (the old tokens are in force).",
            value=1 if tokens.errors else 0,
        )
        store = self._service.policy_store
        if store is not None:
            info = GaugeMetricFamily(
                "spillway_policy", "The policy in force (1), by digest.", labels=["digest"]
            )
            info.add_metric([store.digest], 1)
            yield info
            yield GaugeMetricFamily(
                "spillway_policy_edit_refused",
                "1 while the newest edit of the policy file is refused (the old one is in force).",
                value=1 if store.errors else 0,
            )
            yield CounterMetricFamily(
                "spillway_policy_refused_edits",
                "Edits of the policy file refused since start.",
                value=store.rejected_total,
            )


def start_metrics_server(listen: str, fleet: FleetState, service: ServiceStats) -> tuple[Any, int]:
    """Serve ``/metrics`` on ``listen`` (host:port); return the server and its bound port."""
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet, service))
    server, _thread = start_http_server(
        int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry
    )
    return server, int(server.server_address[1])
