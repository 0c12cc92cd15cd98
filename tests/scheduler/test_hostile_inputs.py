"""Property: whatever an authenticated (or not) client sends, a running scheduler answers with
the right status and keeps serving everyone else.

A real ``spillway scheduler run`` process on loopback gets generated hostile input: random
bytes as Register and Report messages, valid messages with one hostile value each (huge,
negative, NaN and infinite numbers, giant strings, unknown or repeated GPU indices, too many
GPUs or replicas, out-of-range timestamps and enum values, sequences going backwards), messages
over the size limits, and forged or foreign tokens. After every input a legitimate agent
registers and has a report acknowledged within one second. The module prints how many distinct
inputs were tried, the slowest answer, and the scheduler's peak memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.v1 import agent_pb2 as pb
from tests.conftest import Tokens, write_yaml
from tests.scheduler.test_server import REPLICA, full_report, registration

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 64 * 1024  # max_message_bytes of the scheduler under test
EXAMPLES = 200
GIB = 1024**3
REGISTER = "/spillway.v1.AgentService/Register"
REPORT = "/spillway.v1.AgentService/Report"
Code = grpc.StatusCode


def _md(token: str, instance: str = "h1") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), ("spillway-instance", instance))


@dataclass
class Stats:
    inputs: set[str] = field(default_factory=set)
    tried: int = 0
    worst_s: float = 0.0
    worst: str = ""
    worst_probe_s: float = 0.0
    peak_rss: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    #: Sequences of the valid reports sent ahead of a hostile one: fleet state may hold them.
    valid: set[int] = field(default_factory=set)


@dataclass
class Scheduler:
    port: int
    pid: int
    tokens: Tokens
    channel: grpc.Channel
    stats: Stats


@dataclass(frozen=True)
class Case:
    """One hostile input: the method, the raw messages, who sends them, what must come back."""

    label: str
    method: str
    payloads: tuple[bytes, ...]
    expected: frozenset[grpc.StatusCode]
    detail: str = ""  # a part of the status details that names the field
    token: str = "node-a"
    #: The first message is a valid report, to be applied before the hostile one is refused.
    valid_first: bool = False

    def __repr__(self) -> str:  # short, for hypothesis's reports
        sizes = ",".join(str(len(p)) for p in self.payloads)
        return f"Case({self.label!r}, {self.method.rsplit('/', 1)[1]}, bytes={sizes})"


@pytest.fixture(scope="module")
def scheduler(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Scheduler]:
    root = tmp_path_factory.mktemp("hostile")
    tokens = Tokens(root / "tokens.yaml")
    for agent_id in ("node-a", "node-b"):
        tokens.add(agent_id)
    tokens.add("oncall", "operator")
    tokens.add("gw-1", "gateway")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_yaml(
        root / "scheduler.yaml",
        {
            "listen": f"127.0.0.1:{port}",
            "metrics_listen": None,
            "tokens_file": str(tokens.path),
            "report_interval_s": 1.0,
            "max_message_bytes": LIMIT,
        },
    )
    log = (root / "scheduler.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spillway", "scheduler", "run", "--config", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]
    )
    stats = Stats()
    try:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(grpc.RpcError):
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    break
            assert proc.poll() is None, (root / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "the scheduler never served"
            time.sleep(0.05)
        channel.unary_unary(REGISTER)(  # type: ignore[call-arg]
            registration("node-a").SerializeToString(), metadata=_md(tokens.clear["node-a"])
        )
        yield Scheduler(port, proc.pid, tokens, channel, stats)
        assert proc.poll() is None, "the scheduler died"
        fleet = pb.GetFleetResponse.FromString(
            channel.unary_unary("/spillway.v1.FleetService/GetFleet")(  # type: ignore[call-arg]
                b"", metadata=_md(tokens.clear["oncall"]), timeout=5
            )
        )
        node_a = next(a for a in fleet.agents if a.registration.agent_id == "node-a")
        assert node_a.registration == registration("node-a"), "a hostile registration won"
        if node_a.HasField("last_report"):  # only the valid first report of a pair may be
            assert node_a.last_report.sequence in stats.valid, "a hostile report was applied"
        stats.peak_rss = max(stats.peak_rss, _high_water_mark(proc.pid))
    finally:
        channel.close()
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        _print_stats(request, stats)


def _high_water_mark(pid: int) -> int:
    """Peak resident memory of ``pid`` in bytes (Linux's VmHWM), else its current RSS."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(psutil.Process(pid).memory_info().rss)


def _print_stats(request: pytest.FixtureRequest, stats: Stats) -> None:
    capture = request.config.pluginmanager.getplugin("capturemanager")
    context = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with context:
        print(
            f"\nhostile inputs: {stats.tried} tried, {len(stats.inputs)} distinct; slowest "
            f"answer {stats.worst_s * 1000:.1f} ms ({stats.worst}); slowest legitimate "
            f"register+report after one {stats.worst_probe_s * 1000:.1f} ms; scheduler peak RSS "
            f"{stats.peak_rss / 2**20:.1f} MiB; codes {dict(sorted(stats.codes.items()))}"
        )


# -- the inputs -----------------------------------------------------------------------------------

TEXT_FIELDS_REGISTER = ("agent_version", "hostname", "task_queue", "advertise_host", "gpu_source")
HUGE = st.integers(2**44 + 1, 2**64 - 1)
BAD_FRACTION = st.sampled_from([math.nan, math.inf, -math.inf, -1e-9, -1.0, 1.0000001, 1e308])
BAD_RATE = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e9 * 1.01, 1e308])
GIANT = st.integers(257, 3 * LIMIT).map(lambda n: "x" * n)


def _register_case(label: str, message: pb.RegisterRequest, detail: str) -> Case:
    return Case(
        label, REGISTER, (message.SerializeToString(),), frozenset({Code.INVALID_ARGUMENT}), detail
    )


def _report_case(label: str, *messages: pb.CapacityReport, detail: str) -> Case:
    return Case(
        label,
        REPORT,
        tuple(m.SerializeToString() for m in messages),
        frozenset({Code.INVALID_ARGUMENT}),
        detail,
    )


@st.composite
def hostile_registrations(draw: st.DrawFn) -> Case:
    message = registration("node-a")
    kind = draw(
        st.sampled_from(["memory", "many-gpus", "index", "text", "required", "labels", "model"])
    )
    if kind == "memory":
        n = draw(st.integers(0, 7))
        message.gpus[n].memory_total_bytes = draw(HUGE)
        return _register_case(kind, message, f"gpus[{n}].memory_total_bytes")
    if kind == "many-gpus":
        count = draw(st.integers(65, 400))
        del message.gpus[:]
        for i in range(count):
            message.gpus.add(index=i, model="H100", memory_total_bytes=80 * GIB)
        return _register_case(kind, message, "at most 64")
    if kind == "index":
        n = draw(st.integers(0, 7))
        message.gpus[n].index = draw(st.integers(0, 2**32 - 1).filter(lambda i: i != n))
        return _register_case(kind, message, "indexed 0..N-1")
    if kind == "text":
        name = draw(st.sampled_from(TEXT_FIELDS_REGISTER))
        setattr(message, name, draw(GIANT))
        size = message.ByteSize()
        return _register_case(kind, message, "exceeds the limit" if size > LIMIT else name)
    if kind == "required":
        name = draw(st.sampled_from(["pool", "provider", "region"]))
        setattr(message.labels, name, "")
        return _register_case(kind, message, f"labels.{name} is required")
    if kind == "labels":
        for i in range(draw(st.integers(33, 200))):
            message.labels.extra[f"k{i}"] = "v"
        return _register_case(kind, message, "labels.extra has more than 32")
    n = draw(st.integers(0, 7))
    message.gpus[n].model = ""
    return _register_case(kind, message, f"gpus[{n}].model is required")


@st.composite
def hostile_reports(draw: st.DrawFn) -> Case:
    report = full_report("node-a", draw(st.integers(1, 2**40)), [REPLICA])
    n = draw(st.integers(0, 7))
    kind = draw(
        st.sampled_from(
            [
                "memory", "utilization", "kv", "hits", "tokens", "gpu-index", "gpu-twice",
                "gpus-missing", "replica-gpu", "replicas", "port", "requests", "state", "text",
                "sent-at", "started-at", "sequence-back", "sequence-huge",
            ]
        )
    )  # fmt: skip
    replica = report.replicas[0]
    if kind == "memory":
        report.gpus[n].memory_used_bytes = draw(st.integers(80 * GIB + 1, 2**64 - 1))
        return _report_case(kind, report, detail=f"gpus[{n}].memory_used_bytes")
    if kind == "utilization":
        report.gpus[n].utilization = draw(BAD_FRACTION)
        return _report_case(kind, report, detail=f"gpus[{n}].utilization")
    if kind in ("kv", "hits"):
        value = draw(BAD_FRACTION)
        if kind == "kv":
            replica.load.kv_cache_usage = value
        else:
            replica.load.cache_hit_rate = value
        return _report_case(kind, report, detail="kv_cache_usage" if kind == "kv" else "hit_rate")
    if kind == "tokens":
        replica.load.generation_tokens_per_second = draw(BAD_RATE)
        return _report_case(kind, report, detail="generation_tokens_per_second")
    if kind == "gpu-index":
        report.gpus[n].index = draw(st.integers(8, 2**32 - 1))
        return _report_case(kind, report, detail="not a registered GPU")
    if kind == "gpu-twice":
        report.gpus[n].index = (n + draw(st.integers(1, 7))) % 8
        return _report_case(kind, report, detail="listed twice")
    if kind == "gpus-missing":
        keep = draw(st.integers(0, 7))
        del report.gpus[keep:]
        return _report_case(kind, report, detail="every one of the 8 registered")
    if kind == "replica-gpu":
        replica.gpu_indices.append(draw(st.integers(8, 2**32 - 1)))
        return _report_case(kind, report, detail="not registered")
    if kind == "replicas":
        count = draw(st.integers(257, 3000))
        for i in range(count):
            report.replicas.add(replica_id=f"r{i}", state=pb.REPLICA_STATE_HEALTHY)
        detail = "exceeds the limit" if report.ByteSize() > LIMIT else "more than 256 replicas"
        return _report_case(kind, report, detail=detail)
    if kind == "port":
        replica.port = draw(st.integers(65536, 2**32 - 1))
        return _report_case(kind, report, detail="replicas[0].port")
    if kind == "requests":
        name = draw(
            st.sampled_from(["running_requests", "queued_requests", "max_running_requests"])
        )
        setattr(replica.load, name, draw(st.integers(1_000_001, 2**32 - 1)))
        return _report_case(kind, report, detail=f"replicas[0].load.{name}")
    if kind == "state":
        replica.state = draw(st.integers(7, 2**31 - 1))  # type: ignore[assignment]
        return _report_case(kind, report, detail="replicas[0].state has unknown value")
    if kind == "text":
        name = draw(
            st.sampled_from(["replica_id", "deployment", "model", "runtime", "state_reason"])
        )
        setattr(replica, name, draw(GIANT))
        detail = "exceeds the limit" if report.ByteSize() > LIMIT else "longer than 256"
        return _report_case(kind, report, detail=detail)
    if kind in ("sent-at", "started-at"):
        stamp = report.sent_at if kind == "sent-at" else replica.started_at
        if draw(st.booleans()):
            stamp.seconds = draw(st.integers(-(2**62), -1) | st.integers(253_402_300_800, 2**62))
        else:
            stamp.nanos = draw(st.integers(-(2**31), -1) | st.integers(10**9, 2**31 - 1))
        return _report_case(kind, report, detail="sent_at" if kind == "sent-at" else "started_at")
    if kind == "sequence-back":  # the first is valid and applied; the second goes back
        first = full_report("node-a", draw(st.integers(1, 2**40)))
        second = full_report("node-a", draw(st.integers(0, first.sequence)))
        case = _report_case(kind, first, second, detail="must be greater than the previous")
        return Case(**{**case.__dict__, "valid_first": True})
    report.sequence = draw(st.integers(2**63, 2**64 - 1))
    return _report_case(kind, report, detail="larger than")


@st.composite
def random_bytes(draw: st.DrawFn) -> Case:
    method = draw(st.sampled_from([REGISTER, REPORT]))
    count = 1 if method == REGISTER else draw(st.integers(1, 3))
    payloads = tuple(draw(st.binary(min_size=1, max_size=2048)) for _ in range(count))
    # Random bytes are invalid protobuf, or decode to a message naming no agent (refused as
    # another id) or one that fails a check; they are never accepted.
    expected = frozenset({Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED})
    return Case("random-bytes", method, payloads, expected)


@st.composite
def oversized(draw: st.DrawFn) -> Case:
    size = draw(st.integers(LIMIT + 1, 4 * LIMIT) | st.integers(4 * LIMIT + 1, 16 * LIMIT))
    message = registration("node-a")
    message.labels.extra["padding"] = "x" * size
    code = Code.INVALID_ARGUMENT if message.ByteSize() <= 4 * LIMIT else Code.RESOURCE_EXHAUSTED
    method = draw(st.sampled_from([REGISTER, REPORT]))
    payload = message.SerializeToString()  # as a report it is undecodable: size comes first
    detail = "exceeds the limit of 65536" if code == Code.INVALID_ARGUMENT else ""
    return Case("oversized", method, (payload,), frozenset({code}), detail)


@st.composite
def foreign_tokens(draw: st.DrawFn) -> Case:
    method = draw(st.sampled_from([REGISTER, REPORT]))
    payload = (
        registration("node-a").SerializeToString()
        if method == REGISTER
        else full_report("node-a", 1).SerializeToString()
    )
    who = draw(st.sampled_from(["node-b", "oncall", "gw-1", "forged"]))
    if who == "forged":
        token = "spw_" + draw(
            st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60)
        )
        return Case(
            "forged-token", method, (payload,), frozenset({Code.UNAUTHENTICATED}), token=token
        )
    return Case(f"{who}-token", method, (payload,), frozenset({Code.PERMISSION_DENIED}), token=who)


HOSTILE = st.one_of(
    random_bytes(), hostile_registrations(), hostile_reports(), oversized(), foreign_tokens()
)


# -- the property --------------------------------------------------------------------------------


def _send(scheduler: Scheduler, case: Case) -> grpc.RpcError | None:
    token = scheduler.tokens.clear.get(case.token, case.token)
    metadata = _md(token)
    try:
        if case.method == REGISTER:
            register = scheduler.channel.unary_unary(REGISTER)  # type: ignore[call-arg]
            register(case.payloads[0], metadata=metadata, timeout=5)
        else:
            for _ack in scheduler.channel.stream_stream(REPORT)(  # type: ignore[call-arg]
                iter(case.payloads), metadata=metadata, timeout=5
            ):
                pass
    except grpc.RpcError as exc:
        return exc
    return None


def _legitimate_agent(scheduler: Scheduler) -> None:
    """node-b registers and gets its report acknowledged; raises if anything else happens."""
    token = scheduler.tokens.clear["node-b"]
    metadata = _md(token, "probe")
    register = scheduler.channel.unary_unary(REGISTER)  # type: ignore[call-arg]
    register(registration("node-b").SerializeToString(), metadata=metadata, timeout=1)
    call = scheduler.channel.stream_stream(REPORT)  # type: ignore[call-arg]
    acks = call(iter([full_report("node-b", 1).SerializeToString()]), metadata=metadata, timeout=1)
    (ack,) = [pb.ReportAck.FromString(raw) for raw in acks]
    assert ack.sequence == 1


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=HOSTILE)
def test_hostile_input_gets_the_right_status_and_the_scheduler_keeps_serving(
    scheduler: Scheduler, case: Case
) -> None:
    stats = scheduler.stats
    stats.tried += 1
    digest = hashlib.sha256(case.method.encode() + case.token.encode())
    for payload in case.payloads:
        digest.update(len(payload).to_bytes(8, "big") + payload)
    stats.inputs.add(digest.hexdigest())

    if case.valid_first:
        stats.valid.add(pb.CapacityReport.FromString(case.payloads[0]).sequence)
    start = time.monotonic()
    error = _send(scheduler, case)
    took = time.monotonic() - start
    if took > stats.worst_s:
        stats.worst_s, stats.worst = took, repr(case)
    assert error is not None, f"{case!r} was accepted"
    code = error.code()
    details = error.details() or ""
    stats.codes[code.name] = stats.codes.get(code.name, 0) + 1
    assert code in case.expected, f"{case!r}: {code.name}: {details}"
    assert case.detail in details, f"{case!r}: {details}"

    start = time.monotonic()
    _legitimate_agent(scheduler)
    probe = time.monotonic() - start
    stats.worst_probe_s = max(stats.worst_probe_s, probe)
    assert probe < 1.0
    stats.peak_rss = max(stats.peak_rss, int(psutil.Process(scheduler.pid).memory_info().rss))
