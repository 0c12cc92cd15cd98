"""The rules on open streams and the refusal log, as plain objects with a fake clock:
generated sequences of agent processes opening streams, registering, falling silent; and
generated bursts of refusals from many peers."""

from __future__ import annotations

import itertools
import logging

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.auth import Credential, Principal
from scheduler.guard import RefusalLog, peer_host
from scheduler.streams import Refusal, Stream, StreamRegistry, instance_of

SETTINGS = settings(max_examples=150, deadline=None, database=None)
LIMIT = 3.0


class ListHandler(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _credential(agent_id: str, role: str = "agent") -> Credential:
    return Credential(Principal(agent_id, role), f"hash-{agent_id}")  # type: ignore[arg-type]


# An operation: (agent id, process instance or "" for none, what it does, seconds that pass).
OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["node-a", "node-b"]),
        st.sampled_from(["p1", "p2", "p3", ""]),
        st.sampled_from(["open", "register", "report", "end", "sweep"]),
        st.sampled_from([0.0, 0.5, 1.0, LIMIT, LIMIT + 0.5]),
    ),
    min_size=1,
    max_size=40,
)


@SETTINGS
@given(operations=OPERATIONS)
def test_one_live_process_holds_an_agent_id(
    operations: list[tuple[str, str, str, float]],
) -> None:
    clock = Clock()
    registry = StreamRegistry(LIMIT, clock=clock)
    mine: dict[tuple[str, str], list[Stream]] = {}  # streams each process opened
    for agent_id, instance, action, wait in operations:
        clock.now += wait
        holder = registry.report_stream(agent_id)
        live = (
            holder is not None and holder.closing is None and clock.now - holder.last_heard <= LIMIT
        )
        other = holder is not None and not (instance and holder.instance == instance)
        if action in ("open", "register"):
            try:
                if action == "open":
                    stream, replaced = registry.open_report(
                        _credential(agent_id), instance, f"peer-{instance}", None
                    )
                    mine.setdefault((agent_id, instance), []).append(stream)
                else:
                    replaced = registry.check_register(agent_id, instance)
            except Refusal as refusal:
                # Refused exactly when another live process holds the id.
                assert live and other
                assert refusal.code == grpc.StatusCode.ALREADY_EXISTS
                assert repr(agent_id) in refusal.detail
                continue
            assert not (live and other), "a live holder lost its id to another process"
            if replaced is not None:
                assert replaced is holder
                replaced.close(grpc.StatusCode.ALREADY_EXISTS, "replaced")
                if action == "register":
                    registry.forget(replaced)
            if action == "open":
                assert registry.report_stream(agent_id) is stream
        elif action == "report":
            for stream in mine.get((agent_id, instance), [])[-1:]:
                if stream.closing is None:
                    registry.heard(stream)
        elif action == "end":
            for stream in mine.pop((agent_id, instance), []):
                registry.forget(stream)
        else:
            for stream in registry.silent():
                assert clock.now - stream.last_heard > LIMIT
                stream.close(grpc.StatusCode.DEADLINE_EXCEEDED, "silent")
                registry.forget(stream)
        # One Report stream per agent id at most, and never one already being closed.
        assert registry.open_reports <= 2
        assert all(s.closing is None for s in registry.streams())


def test_the_same_process_reconnecting_replaces_its_own_stream() -> None:
    clock = Clock()
    registry = StreamRegistry(LIMIT, clock=clock)
    first, _ = registry.open_report(_credential("node-a"), "p1", "peer", None)
    assert registry.check_register("node-a", "p1") is None
    second, replaced = registry.open_report(_credential("node-a"), "p1", "peer", None)
    assert replaced is first and registry.report_stream("node-a") is second
    registry.forget(first)  # the old stream's handler ends later: nothing changes
    assert registry.report_stream("node-a") is second
    with pytest.raises(Refusal):  # a process without the header is someone else
        registry.open_report(_credential("node-a"), "", "peer", None)
    clock.now += LIMIT + 0.1
    assert registry.silent() == [second]
    _third, replaced = registry.open_report(_credential("node-a"), "p2", "peer", None)
    assert replaced is second


def test_fleet_watches_are_bounded_per_gateway() -> None:
    registry = StreamRegistry(LIMIT, max_watches=4)
    watches = [registry.open_watch(_credential("gw-1", "gateway"), "peer", None) for _ in range(4)]
    with pytest.raises(Refusal) as caught:
        registry.open_watch(_credential("gw-1", "gateway"), "peer", None)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    registry.open_watch(_credential("gw-2", "gateway"), "peer", None)  # another gateway
    registry.forget(watches[0])
    registry.open_watch(_credential("gw-1", "gateway"), "peer", None)
    assert registry.open_watches == 5
    assert registry.silent() == []  # watches are never "silent": the scheduler sends


def test_revoked_streams_are_those_whose_token_names_someone_else_now() -> None:
    registry = StreamRegistry(LIMIT)
    a, _ = registry.open_report(_credential("node-a"), "p1", "peer", None)
    b, _ = registry.open_report(_credential("node-b"), "p1", "peer", None)
    w = registry.open_watch(_credential("gw-1", "gateway"), "peer", None)
    tokens = {"hash-node-a": Principal("node-a", "agent"), "hash-gw-1": Principal("x", "gateway")}
    assert registry.revoked(tokens.get) == [b, w]
    assert a.closing is None


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((), ""),
        ((("authorization", "Bearer x"),), ""),
        ((("spillway-instance", "3f9a_c-1"),), "3f9a_c-1"),
    ],
)
def test_instance_header(metadata: tuple[tuple[str, str], ...], expected: str) -> None:
    assert instance_of(metadata) == expected


@SETTINGS
@given(value=st.text(max_size=80) | st.binary(max_size=8))
def test_an_instance_header_is_a_short_plain_id_or_refused(value: str | bytes) -> None:
    plain = (
        isinstance(value, str)
        and 0 < len(value) <= 64
        and value.isascii()
        and value.replace("-", "").replace("_", "").isalnum()
    )
    try:
        assert instance_of([("spillway-instance", value)]) == value
        assert plain
    except Refusal as refusal:
        assert not plain
        assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT


# -- the refusal log -----------------------------------------------------------------------------

PEERS = ["ipv4:10.0.0.1", "ipv4:10.0.0.2", "ipv6:[::1]", "unix:/tmp/s"]
REFUSALS = st.lists(
    st.tuples(
        st.sampled_from(PEERS),
        st.integers(1, 65535),
        st.sampled_from(["UNAUTHENTICATED", "INVALID_ARGUMENT"]),
        st.floats(0, 4),
    ),
    min_size=1,
    max_size=300,
)


@SETTINGS
@given(refusals=REFUSALS)
def test_refusals_are_logged_at_most_once_per_peer_and_code_per_window(
    refusals: list[tuple[str, int, str, float]],
) -> None:
    clock = Clock()
    logger = logging.getLogger("test.refusals")
    logger.propagate = False
    handler = ListHandler()
    records = handler.records
    logger.addHandler(handler)
    try:
        log = RefusalLog(logger, 10.0, clock=clock)
        first_lines: dict[tuple[str, str], list[float]] = {}
        for peer, port, code, wait in refusals:
            clock.now += wait
            before = len(records)
            full = f"{peer}:{port}" if peer.startswith("ip") else peer
            log.refused(full, code, "why")
            if len(records) > before:
                first_lines.setdefault((peer, code), []).append(clock.now)
        clock.now += 10.0
        log.flush()
    finally:
        logger.removeHandler(handler)
    for times in first_lines.values():  # at most one line per key per 10 s
        assert all(b - a >= 10.0 for a, b in itertools.pairwise(times))
    # Every refusal is accounted for: logged, or counted in a later line.
    counted = 0
    for record in records:
        message = record.getMessage()
        if message.startswith("refused a call"):
            counted += 1
            if "more like it" in message:
                counted += int(message.rsplit("(and ", 1)[1].split()[0])
        else:
            counted += int(message.split()[1])
    assert counted == len(refusals)
    assert len(records) <= 2 * len(first_lines) + sum(map(len, first_lines.values()))


def test_230_refusals_from_one_peer_are_a_few_lines() -> None:
    clock = Clock()
    logger = logging.getLogger("test.refusals.burst")
    logger.propagate = False
    handler = ListHandler()
    records = handler.records
    logger.addHandler(handler)
    log = RefusalLog(logger, 10.0, clock=clock)
    for n in range(230):
        clock.now += 0.01
        log.refused(f"ipv4:10.0.0.9:{40000 + n}", "UNAUTHENTICATED", "missing or unknown token")
    clock.now += 10
    log.flush()
    logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "refused a call from ipv4:10.0.0.9: UNAUTHENTICATED: missing or unknown token",
        "refused 229 more calls from ipv4:10.0.0.9 with UNAUTHENTICATED in 10s (the last: "
        "missing or unknown token)",
    ]


def test_peer_host_drops_the_port() -> None:
    assert peer_host("ipv4:127.0.0.1:5555") == "ipv4:127.0.0.1"
    assert peer_host("ipv6:[::1]:5555") == "ipv6:[::1]"
    assert peer_host("unix:/run/s.sock") == "unix:/run/s.sock"
