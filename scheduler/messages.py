"""Protobuf to fleet dataclasses and back, and the checks on what agents and gateways send.

Every message from an agent or a gateway is checked before it touches fleet state; a message
that fails a check is answered with INVALID_ARGUMENT by the server, which names the field.
Limits keep one agent or gateway from growing the scheduler's memory without bound. The fleet
a gateway may route to (:func:`routable_replicas_to_pb`) is built here too, from fleet records.
Pure functions: no I/O, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from google.protobuf import timestamp_pb2

from common.v1 import agent_pb2 as pb
from decisions.fleetview import ReplicaState
from scheduler.fleet import (
    AgentHealth,
    AgentRecord,
    DeploymentTraffic,
    GatewayRecord,
    GatewayReport,
    Gpu,
    GpuState,
    Labels,
    Registration,
    Replica,
    ReplicaLoad,
    Report,
    TierTraffic,
)

MAX_GPUS = 64
MAX_REPLICAS = 256
MAX_LABELS = 32
MAX_TEXT = 256
#: The documented ranges of the numbers agents send (proto/spillway/v1/agent.proto says the same).
#: A GPU's memory: 16 TiB, sixty times the largest GPU made today.
MAX_GPU_MEMORY_BYTES = 1 << 44
#: Running, queued and the server's cap on running requests, per replica.
MAX_REQUESTS = 1_000_000
MAX_TOKENS_PER_SECOND = 1e9
MAX_PORT = 65535
#: Report sequence numbers fit a signed 64-bit integer; they increase within a stream.
MAX_SEQUENCE = (1 << 63) - 1
#: Timestamps (sent_at, started_at): from the Unix epoch to the end of year 9999.
MAX_TIMESTAMP_SECONDS = 253_402_300_799
#: Deployments one gateway report may list, and in-flight targets per deployment.
MAX_DEPLOYMENTS = 256
MAX_TARGETS = 1024
TIERS = ("reserved", "rented", "managed")

_STATE_FROM_PB = {
    pb.REPLICA_STATE_UNSPECIFIED: ReplicaState.UNKNOWN,
    pb.REPLICA_STATE_STARTING: ReplicaState.STARTING,
    pb.REPLICA_STATE_HEALTHY: ReplicaState.HEALTHY,
    pb.REPLICA_STATE_DRAINING: ReplicaState.DRAINING,
    pb.REPLICA_STATE_CRASH_LOOPING: ReplicaState.CRASH_LOOPING,
    pb.REPLICA_STATE_FAILED: ReplicaState.FAILED,
    pb.REPLICA_STATE_STOPPED: ReplicaState.STOPPED,
}
_STATE_TO_PB = {state: number for number, state in _STATE_FROM_PB.items()}
_HEALTH_TO_PB = {
    AgentHealth.CONNECTED: pb.AGENT_HEALTH_CONNECTED,
    AgentHealth.STALE: pb.AGENT_HEALTH_STALE,
}


class InvalidMessage(ValueError):
    """A message from an agent is well-formed protobuf but not acceptable."""


def _text(value: str, field: str, *, required: bool = False) -> str:
    if required and not value:
        raise InvalidMessage(f"{field} is required")
    if len(value) > MAX_TEXT:
        raise InvalidMessage(f"{field} is longer than {MAX_TEXT} characters")
    return value


def registration_from_pb(message: pb.RegisterRequest) -> Registration:
    if len(message.gpus) > MAX_GPUS:
        raise InvalidMessage(f"gpus lists {len(message.gpus)} GPUs; at most {MAX_GPUS}")
    labels = message.labels
    if len(labels.extra) > MAX_LABELS:
        raise InvalidMessage(f"labels.extra has more than {MAX_LABELS} entries")
    for n, g in enumerate(message.gpus):
        if g.memory_total_bytes > MAX_GPU_MEMORY_BYTES:
            raise InvalidMessage(
                f"gpus[{n}].memory_total_bytes {g.memory_total_bytes} is more than "
                f"{MAX_GPU_MEMORY_BYTES} (16 TiB)"
            )
    gpus = tuple(
        sorted(
            (
                Gpu(
                    index=g.index,
                    uuid=_text(g.uuid, f"gpus[{n}].uuid"),
                    model=_text(g.model, f"gpus[{n}].model", required=True),
                    memory_total_bytes=g.memory_total_bytes,
                )
                for n, g in enumerate(message.gpus)
            ),
            key=lambda g: g.index,
        )
    )
    if [g.index for g in gpus] != list(range(len(gpus))):
        raise InvalidMessage("gpus must be indexed 0..N-1, each index once")
    return Registration(
        agent_id=_text(message.agent_id, "agent_id", required=True),
        agent_version=_text(message.agent_version, "agent_version"),
        labels=Labels(
            pool=_text(labels.pool, "labels.pool", required=True),
            provider=_text(labels.provider, "labels.provider", required=True),
            region=_text(labels.region, "labels.region", required=True),
            zone=_text(labels.zone, "labels.zone"),
            residency_group=_text(labels.residency_group, "labels.residency_group"),
            instance_id=_text(labels.instance_id, "labels.instance_id"),
            extra={
                _text(k, "labels.extra key"): _text(v, f"labels.extra[{k}]")
                for k, v in labels.extra.items()
            },
        ),
        gpus=gpus,
        gpu_source=_text(message.gpu_source, "gpu_source"),
        hostname=_text(message.hostname, "hostname"),
        task_queue=_text(message.task_queue, "task_queue"),
        advertise_host=_text(message.advertise_host, "advertise_host"),
    )


def _check_time(ts: timestamp_pb2.Timestamp, field: str) -> float:
    seconds, nanos = ts.seconds, ts.nanos
    if not 0 <= seconds <= MAX_TIMESTAMP_SECONDS or not 0 <= nanos < 1_000_000_000:
        raise InvalidMessage(
            f"{field} must be between 1970-01-01 and 9999-12-31 with nanos 0..999999999, got "
            f"seconds={seconds} nanos={nanos}"
        )
    return seconds + nanos / 1e9


def report_from_pb(message: pb.CapacityReport, registration: Registration) -> Report:
    """Check a report against the agent's registration and convert it.

    The report must list every registered GPU exactly once, with no more memory in use than
    the GPU has; a replica may only name registered GPUs, each once. Every number must be in
    its documented range (the constants above). This runs for every report the scheduler
    receives, so the checks are written inline.
    """
    registered = registration.gpus  # sorted by index: registered[i].index == i
    inventory = len(registered)
    if len(message.gpus) > inventory:
        raise InvalidMessage(
            f"report lists {len(message.gpus)} GPUs; the agent registered {inventory}"
        )
    if len(message.replicas) > MAX_REPLICAS:
        raise InvalidMessage(f"report lists more than {MAX_REPLICAS} replicas")
    gpus = []
    seen = 0  # bit i: GPU i listed
    for n, g in enumerate(message.gpus):
        index = g.index
        utilization = g.utilization
        replica_id = g.replica_id
        used = g.memory_used_bytes
        if index >= inventory:
            raise InvalidMessage(f"gpus[{n}].index {index} is not a registered GPU")
        if seen >> index & 1:
            raise InvalidMessage(f"gpus[{n}].index {index} is listed twice")
        seen |= 1 << index
        if used > registered[index].memory_total_bytes:
            raise InvalidMessage(
                f"gpus[{n}].memory_used_bytes {used} is more than GPU {index} has "
                f"({registered[index].memory_total_bytes})"
            )
        if not 0.0 <= utilization <= 1.0:  # also false for NaN
            raise InvalidMessage(
                f"gpus[{n}].utilization must be between 0 and 1, got {utilization}"
            )
        if len(replica_id) > MAX_TEXT:
            raise InvalidMessage(f"gpus[{n}].replica_id is longer than {MAX_TEXT} characters")
        gpus.append(GpuState(index, used, utilization, replica_id, g.healthy))
    if len(gpus) != inventory:
        raise InvalidMessage(
            f"report lists {len(gpus)} GPUs; it must list every one of the {inventory} "
            "registered, each once"
        )
    replicas = []
    names: set[str] = set()
    for n, r in enumerate(message.replicas):
        field = f"replicas[{n}]"
        indices = r.gpu_indices
        if len(indices) > inventory:
            raise InvalidMessage(
                f"{field}.gpu_indices names more GPUs than the {inventory} registered"
            )
        held = 0
        for index in indices:
            if index >= inventory:
                raise InvalidMessage(f"{field}.gpu_indices names GPU {index}, not registered")
            if held >> index & 1:
                raise InvalidMessage(f"{field}.gpu_indices names GPU {index} twice")
            held |= 1 << index
        state = _STATE_FROM_PB.get(r.state)
        if state is None:
            raise InvalidMessage(f"{field}.state has unknown value {r.state}")
        replica_id, deployment, model = r.replica_id, r.deployment, r.model
        runtime, reason = r.runtime, r.state_reason
        if not replica_id:
            raise InvalidMessage(f"{field}.replica_id is required")
        if max(len(replica_id), len(deployment), len(model), len(runtime), len(reason)) > MAX_TEXT:
            raise InvalidMessage(f"{field} has a text field longer than {MAX_TEXT} characters")
        if replica_id in names:
            raise InvalidMessage(f"{field}.replica_id {replica_id!r} is listed twice")
        names.add(replica_id)
        if r.port > MAX_PORT:
            raise InvalidMessage(f"{field}.port must be 0..{MAX_PORT}, got {r.port}")
        load = r.load
        kv, hits, tokens = (
            load.kv_cache_usage,
            load.cache_hit_rate,
            load.generation_tokens_per_second,
        )
        running, queued, cap = (
            load.running_requests,
            load.queued_requests,
            load.max_running_requests,
        )
        if not 0.0 <= kv <= 1.0:
            raise InvalidMessage(f"{field}.load.kv_cache_usage must be between 0 and 1, got {kv}")
        if not 0.0 <= hits <= 1.0:
            raise InvalidMessage(f"{field}.load.cache_hit_rate must be between 0 and 1, got {hits}")
        if not 0.0 <= tokens <= MAX_TOKENS_PER_SECOND:
            raise InvalidMessage(
                f"{field}.load.generation_tokens_per_second must be a finite number from 0 to "
                f"{MAX_TOKENS_PER_SECOND:.0e}, got {tokens}"
            )
        if max(running, queued, cap) > MAX_REQUESTS:
            name, value = next(
                (name, value)
                for name, value in (
                    ("running_requests", running),
                    ("queued_requests", queued),
                    ("max_running_requests", cap),
                )
                if value > MAX_REQUESTS
            )
            raise InvalidMessage(f"{field}.load.{name} must be 0..{MAX_REQUESTS}, got {value}")
        started = (
            _check_time(r.started_at, f"{field}.started_at") if r.HasField("started_at") else None
        )
        replicas.append(
            Replica(
                replica_id,
                deployment,
                model,
                runtime,
                r.port,
                tuple(indices),
                state,
                reason,
                ReplicaLoad(running, queued, kv, tokens, hits, cap),
                r.restarts,
                started,
            )
        )
    if message.sequence > MAX_SEQUENCE:
        raise InvalidMessage(f"sequence {message.sequence} is larger than {MAX_SEQUENCE}")
    return Report(
        message.sequence, _check_time(message.sent_at, "sent_at"), tuple(gpus), tuple(replicas)
    )


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    whole = math.floor(unix_seconds)
    carry, nanos = divmod(round((unix_seconds - whole) * 1e9), 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=whole + carry, nanos=nanos)


def registration_to_pb(reg: Registration) -> pb.RegisterRequest:
    labels = reg.labels
    return pb.RegisterRequest(
        agent_id=reg.agent_id,
        agent_version=reg.agent_version,
        labels=pb.AgentLabels(
            pool=labels.pool,
            provider=labels.provider,
            region=labels.region,
            zone=labels.zone,
            residency_group=labels.residency_group,
            instance_id=labels.instance_id,
            extra=labels.extra,
        ),
        gpus=[
            pb.Gpu(
                index=g.index, uuid=g.uuid, model=g.model, memory_total_bytes=g.memory_total_bytes
            )
            for g in reg.gpus
        ],
        gpu_source=reg.gpu_source,
        hostname=reg.hostname,
        task_queue=reg.task_queue,
        advertise_host=reg.advertise_host,
    )


def report_to_pb(agent_id: str, report: Report) -> pb.CapacityReport:
    message = pb.CapacityReport(
        agent_id=agent_id,
        sequence=report.sequence,
        sent_at=_timestamp(report.sent_at),
        gpus=[
            pb.GpuState(
                index=g.index,
                memory_used_bytes=g.memory_used_bytes,
                utilization=g.utilization,
                replica_id=g.replica_id,
                healthy=g.healthy,
            )
            for g in report.gpus
        ],
    )
    for r in report.replicas:
        replica = message.replicas.add(
            replica_id=r.replica_id,
            deployment=r.deployment,
            model=r.model,
            runtime=r.runtime,
            port=r.port,
            gpu_indices=r.gpu_indices,
            state=_STATE_TO_PB[r.state],
            state_reason=r.state_reason,
            load=pb.ReplicaLoad(
                running_requests=r.load.running_requests,
                queued_requests=r.load.queued_requests,
                kv_cache_usage=r.load.kv_cache_usage,
                generation_tokens_per_second=r.load.generation_tokens_per_second,
                cache_hit_rate=r.load.cache_hit_rate,
                max_running_requests=r.load.max_running_requests,
            ),
            restarts=r.restarts,
        )
        if r.started_at is not None:
            replica.started_at.CopyFrom(_timestamp(r.started_at))
    return message


def agent_status_to_pb(record: AgentRecord, health: AgentHealth) -> pb.AgentStatus:
    status = pb.AgentStatus(
        registration=registration_to_pb(record.registration),
        health=_HEALTH_TO_PB[health],
        registered_at=_timestamp(record.registered_at),
        reports_received=record.reports_received,
    )
    if record.last_report_at is not None:
        status.last_report_at.CopyFrom(_timestamp(record.last_report_at))
    if record.report is not None:
        status.last_report.CopyFrom(report_to_pb(record.agent_id, record.report))
    return status


# -- gateways ---------------------------------------------------------------------------------


def _rate(value: float, field: str) -> float:
    if not 0.0 <= value < math.inf:  # also false for NaN
        raise InvalidMessage(f"{field} must be a finite number >= 0, got {value}")
    return value


def gateway_report_from_pb(message: pb.GatewayReport) -> GatewayReport:
    """Check a gateway's traffic report and convert it."""
    gateway_id = _text(message.gateway_id, "gateway_id", required=True)
    if len(message.deployments) > MAX_DEPLOYMENTS:
        raise InvalidMessage(f"deployments lists more than {MAX_DEPLOYMENTS} deployments")
    seen: set[str] = set()
    deployments = []
    for n, d in enumerate(message.deployments):
        field = f"deployments[{n}]"
        name = _text(d.deployment, f"{field}.deployment", required=True)
        if name in seen:
            raise InvalidMessage(f"{field}.deployment {name!r} is listed twice")
        seen.add(name)
        if len(d.in_flight) > MAX_TARGETS:
            raise InvalidMessage(f"{field}.in_flight has more than {MAX_TARGETS} targets")
        in_flight = {}
        for target, count in d.in_flight.items():
            in_flight[_text(target, f"{field}.in_flight key", required=True)] = count
        tiers = []
        tier_names: set[str] = set()
        for t, tier in enumerate(d.tiers):
            if tier.tier not in TIERS:
                raise InvalidMessage(
                    f"{field}.tiers[{t}].tier must be one of {', '.join(TIERS)}, "
                    f"got {tier.tier[:MAX_TEXT]!r}"
                )
            if tier.tier in tier_names:
                raise InvalidMessage(f"{field}.tiers[{t}].tier {tier.tier!r} is listed twice")
            tier_names.add(tier.tier)
            tiers.append(
                TierTraffic(tier.tier, tier.requests, tier.input_tokens, tier.output_tokens)
            )
        deployments.append(
            DeploymentTraffic(
                deployment=name,
                queue_depth=d.queue_depth,
                oldest_queued_s=_rate(d.oldest_queued_s, f"{field}.oldest_queued_s"),
                in_flight=in_flight,
                tiers=tuple(tiers),
                overflow_tokens_per_s=_rate(
                    d.overflow_tokens_per_s, f"{field}.overflow_tokens_per_s"
                ),
                refused=d.refused,
            )
        )
    return GatewayReport(gateway_id, _seconds(message.sent_at), tuple(deployments))


def gateway_report_to_pb(report: GatewayReport) -> pb.GatewayReport:
    return pb.GatewayReport(
        gateway_id=report.gateway_id,
        sent_at=_timestamp(report.sent_at),
        deployments=[
            pb.DeploymentTraffic(
                deployment=d.deployment,
                queue_depth=d.queue_depth,
                oldest_queued_s=d.oldest_queued_s,
                in_flight=d.in_flight,
                tiers=[
                    pb.TierTraffic(
                        tier=t.tier,
                        requests=t.requests,
                        input_tokens=t.input_tokens,
                        output_tokens=t.output_tokens,
                    )
                    for t in d.tiers
                ],
                overflow_tokens_per_s=d.overflow_tokens_per_s,
                refused=d.refused,
            )
            for d in report.deployments
        ],
    )


def gateway_status_to_pb(record: GatewayRecord) -> pb.GatewayStatus:
    return pb.GatewayStatus(
        last_report=gateway_report_to_pb(record.report),
        received_at=_timestamp(record.received_at),
    )


def routable_replicas_to_pb(
    agents: Iterable[tuple[AgentRecord, AgentHealth]],
    state_of: Callable[[Replica], ReplicaState] = lambda r: r.state,
) -> list[pb.RoutableReplica]:
    """Every replica of every connected agent, as a gateway routes to it.

    ``state_of`` gives a replica's state as the scheduler shows it (DRAINING while it drains
    the replica through the gateways, see :meth:`scheduler.fleet.FleetState.state_of`).
    """
    out = []
    for record, health in agents:
        if health is not AgentHealth.CONNECTED or record.report is None:
            continue
        reg = record.registration
        labels = reg.labels
        host = reg.replica_host
        for r in record.report.replicas:
            out.append(
                pb.RoutableReplica(
                    replica_id=r.replica_id,
                    deployment=r.deployment,
                    agent_id=reg.agent_id,
                    host=host,
                    port=r.port,
                    pool=labels.pool,
                    provider=labels.provider,
                    region=labels.region,
                    residency_group=labels.residency_group,
                    state=_STATE_TO_PB[state_of(r)],
                    running_requests=r.load.running_requests,
                    queued_requests=r.load.queued_requests,
                    max_running_requests=r.load.max_running_requests,
                )
            )
    return out
