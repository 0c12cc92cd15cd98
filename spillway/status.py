"""``spillway status``: read the fleet from a running scheduler and show it as a table or JSON.

The tables: agents, their replicas, and per deployment what the gateways see of it (queue
depth, the oldest wait, requests in flight, tokens per second overflowing to managed
endpoints), summed over the gateways that reported recently. ``--json`` is the ``GetFleet``
answer as it is, with a ``deployments`` summary of the gateways' figures added.

With several schedulers (active-active; ``--scheduler`` given more than once, or the
``scheduler.addresses`` of an agent's or gateway's config) they are asked in the order given
and the first that answers is shown: every scheduler sees every agent, so any one's fleet is
the fleet.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict
from rich.console import Group
from rich.table import Table
from rich.text import Text

from common.configfile import load_model
from common.schedulerlink import ClientTls, SchedulerEndpoint, auth_metadata, open_channel
from common.v1 import agent_pb2 as pb
from common.v1 import agent_pb2_grpc as pb_grpc

_REPLICA_STATE = {
    pb.REPLICA_STATE_UNSPECIFIED: "unknown",
    pb.REPLICA_STATE_STARTING: "starting",
    pb.REPLICA_STATE_HEALTHY: "healthy",
    pb.REPLICA_STATE_DRAINING: "draining",
    pb.REPLICA_STATE_CRASH_LOOPING: "crash-looping",
    pb.REPLICA_STATE_FAILED: "failed",
    pb.REPLICA_STATE_STOPPED: "stopped",
}
_HEALTH_STYLE = {
    pb.AGENT_HEALTH_CONNECTED: ("connected", "green"),
    pb.AGENT_HEALTH_STALE: ("stale", "yellow"),
}


async def fetch_fleet(
    address: str, token: str, tls: ClientTls | None, deadline_s: float = 10.0
) -> pb.GetFleetResponse:
    channel = open_channel(address, tls)
    try:
        stub = pb_grpc.FleetServiceStub(channel)
        response: pb.GetFleetResponse = await stub.GetFleet(
            pb.GetFleetRequest(), metadata=auth_metadata(token), timeout=deadline_s
        )
        return response
    finally:
        await channel.close(None)


class NoSchedulerAnswered(Exception):
    """Every listed scheduler failed; ``str()`` names each with its error, on one line."""

    def __init__(self, failures: Sequence[tuple[str, grpc.aio.AioRpcError]]) -> None:
        self.failures = list(failures)
        super().__init__(
            "; ".join(
                f"scheduler {address}: {exc.code().name}: {exc.details()}"
                for address, exc in failures
            )
        )


async def fetch_fleet_from(
    addresses: Sequence[str], token: str, tls: ClientTls | None, deadline_s: float = 10.0
) -> tuple[str, pb.GetFleetResponse]:
    """The fleet from the first of ``addresses`` that answers, and which one it was."""
    failures: list[tuple[str, grpc.aio.AioRpcError]] = []
    for address in addresses:
        try:
            return address, await fetch_fleet(address, token, tls, deadline_s)
        except grpc.aio.AioRpcError as exc:
            failures.append((address, exc))
    raise NoSchedulerAnswered(failures)


class _WithScheduler(BaseModel):
    """Any client config (an agent's, a gateway's): only its ``scheduler`` section is read."""

    model_config = ConfigDict(extra="ignore")
    scheduler: SchedulerEndpoint


def schedulers_of(path: Path) -> tuple[tuple[str, ...], ClientTls | None]:
    """The scheduler addresses and TLS settings of an agent's or gateway's config file (its
    token is not used: ``spillway status`` needs an operator's)."""
    endpoint = load_model(path, _WithScheduler).scheduler
    endpoint.resolve_paths(path.resolve().parent)
    return endpoint.address_list, endpoint.tls


def gateway_figures(fleet: pb.GetFleetResponse) -> dict[str, dict[str, Any]]:
    """Per deployment, the gateways' figures together: queue depth, oldest wait (the longest),
    in flight (all targets), overflow tokens/s, and how many gateways report it."""
    out: dict[str, dict[str, Any]] = {}
    for status in fleet.gateways:
        for d in status.last_report.deployments:
            entry = out.setdefault(
                d.deployment,
                {
                    "gateways": 0,
                    "queue_depth": 0,
                    "oldest_queued_s": 0.0,
                    "in_flight": 0,
                    "overflow_tokens_per_s": 0.0,
                },
            )
            entry["gateways"] += 1
            entry["queue_depth"] += d.queue_depth
            entry["oldest_queued_s"] = max(entry["oldest_queued_s"], d.oldest_queued_s)
            entry["in_flight"] += sum(d.in_flight.values())
            entry["overflow_tokens_per_s"] += d.overflow_tokens_per_s
    return dict(sorted(out.items()))


def fleet_json(fleet: pb.GetFleetResponse) -> dict[str, Any]:
    data = MessageToDict(fleet, preserving_proto_field_name=True)
    data["deployments"] = {
        name: {"gateway": figures} for name, figures in gateway_figures(fleet).items()
    }
    return data


def _age(ts_seconds: float, now: float) -> str:
    age = max(0.0, now - ts_seconds)
    return f"{age:.1f}s ago" if age < 120 else f"{age / 60:.0f}m ago"


def _gpu_summary(agent: pb.AgentStatus) -> tuple[str, str]:
    """("free/total", "model") for an agent's GPUs."""
    gpus = agent.registration.gpus
    if not gpus:
        return "0/0", "-"
    report = agent.last_report
    if agent.HasField("last_report"):
        free = sum(1 for g in report.gpus if g.healthy and not g.replica_id)
    else:
        free = len(gpus)
    models = sorted({g.model.removeprefix("NVIDIA ") for g in gpus})
    return f"{free}/{len(gpus)}", ", ".join(models)


def _gateway_table(fleet: pb.GetFleetResponse) -> Table:
    table = Table(title="At the gateways", title_justify="left")
    table.add_column("DEPLOYMENT")
    for column in ("REPLICAS", "GATEWAYS", "QUEUE", "OLDEST WAIT", "IN FLIGHT", "OVERFLOW TOK/S"):
        table.add_column(column, justify="right")
    replicas: dict[str, list[int]] = {}
    for agent in fleet.agents:
        for r in agent.last_report.replicas:
            counts = replicas.setdefault(r.deployment, [0, 0])
            counts[0] += r.state == pb.REPLICA_STATE_HEALTHY
            counts[1] += 1
    for name, g in gateway_figures(fleet).items():
        healthy, total = replicas.get(name, [0, 0])
        table.add_row(
            name,
            f"{healthy}/{total} healthy",
            str(g["gateways"]),
            str(g["queue_depth"]),
            f"{g['oldest_queued_s']:.1f}s",
            str(g["in_flight"]),
            f"{g['overflow_tokens_per_s']:.0f}",
        )
    return table


def render(fleet: pb.GetFleetResponse, now: float | None = None, address: str = "") -> Group:
    """A table of agents and, when any run, a table of replicas; when gateways report, a
    table of each deployment's figures at the gateways beside its replica count. ``address``:
    the scheduler that answered, named in the title."""
    now = time.time() if now is None else now
    interval = fleet.report_interval.seconds + fleet.report_interval.nanos / 1e9
    at = f" at {address}" if address else ""
    agents = Table(
        title=f"Fleet: {len(fleet.agents)} agents, scheduler {fleet.scheduler_instance}{at}, "
        f"reports every {interval:g}s",
        title_justify="left",
    )
    for column in ("AGENT", "POOL", "WHERE", "RESIDENCY", "GPUS FREE", "GPU MODEL", "REPLICAS"):
        agents.add_column(column)
    agents.add_column("RUN", justify="right")
    agents.add_column("QUEUE", justify="right")
    agents.add_column("HEALTH")
    agents.add_column("LAST REPORT", justify="right")
    replicas = Table(title="Replicas", title_justify="left")
    for column in ("REPLICA", "AGENT", "DEPLOYMENT", "MODEL", "STATE", "GPUS", "PORT"):
        replicas.add_column(column)
    for column in ("RUN", "QUEUE", "KV", "TOK/S", "RESTARTS"):
        replicas.add_column(column, justify="right")

    for agent in fleet.agents:
        reg = agent.registration
        labels = reg.labels
        where = "/".join(part for part in (labels.provider, labels.region, labels.zone) if part)
        report = agent.last_report
        healthy = sum(1 for r in report.replicas if r.state == pb.REPLICA_STATE_HEALTHY)
        running = sum(r.load.running_requests for r in report.replicas)
        queued = sum(r.load.queued_requests for r in report.replicas)
        health, style = _HEALTH_STYLE.get(agent.health, ("unknown", "red"))
        last = (
            _age(agent.last_report_at.seconds + agent.last_report_at.nanos / 1e9, now)
            if agent.HasField("last_report_at")
            else "never"
        )
        agents.add_row(
            reg.agent_id,
            labels.pool,
            where,
            labels.residency_group or "-",
            *_gpu_summary(agent),
            f"{healthy}/{len(report.replicas)} healthy" if report.replicas else "-",
            str(running),
            str(queued),
            Text(health, style=style),
            last,
        )
        for r in report.replicas:
            replicas.add_row(
                r.replica_id,
                reg.agent_id,
                r.deployment,
                r.model,
                _REPLICA_STATE.get(r.state, "unknown")
                + (f" ({r.state_reason})" if r.state_reason else ""),
                ",".join(str(i) for i in r.gpu_indices),
                str(r.port),
                str(r.load.running_requests),
                str(r.load.queued_requests),
                f"{r.load.kv_cache_usage:.0%}",
                f"{r.load.generation_tokens_per_second:.0f}",
                str(r.restarts),
            )
    tables = [agents, *([replicas] if replicas.row_count else [])]
    if fleet.gateways:
        tables.append(_gateway_table(fleet))
    return Group(*tables)
