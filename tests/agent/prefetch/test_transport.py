"""The byte-range transport on its own: both body paths (``splice`` through a pipe, and
``recv_into`` + ``pwrite`` through a buffer), the switch from one to the other when a file
cannot take ``splice``, and a destination that fills up half-way."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.prefetch import DiskFullError, transport
from agent.prefetch.transport import Connections, fetch_range
from tests.agent.prefetch.conftest import small_tmpfs
from tests.agent.prefetch.faults import STALL_S, Fault, FaultyOrigin

MiB = 1024 * 1024


@pytest.fixture
def conns() -> Iterator[Connections]:
    pool = Connections(timeout_s=10.0)
    yield pool
    pool.close_all()


def _get(
    conns: Connections,
    url: str,
    fd: int,
    start: int,
    length: int,
    size: int,
    counted: list[int] | None = None,
) -> list[int]:
    """fetch_range through a 64 KiB buffer; returns the byte counts it reported, also appended
    to ``counted`` so that a test expecting a raise still sees them."""
    counted = [] if counted is None else counted
    fetch_range(
        conns,
        url,
        {},
        start,
        length,
        size,
        fd,
        memoryview(bytearray(64 * 1024)),
        counted.append,
        threading.Event(),
        "w.bin",
    )
    return counted


def test_ranges_land_at_their_offsets_over_one_connection(
    origin: FaultyOrigin, conns: Connections, tmp_path: Path, body_path: str
) -> None:
    data = os.urandom(3 * MiB + 17)
    url = origin.add("w.bin", data)
    target = tmp_path / "w.bin"
    fd = os.open(target, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, len(data))
        # Out of order, odd sizes, on one keep-alive connection.
        for start, end in [(2 * MiB, len(data)), (0, 5), (5, 2 * MiB)]:
            counted = _get(conns, url, fd, start, end - start, len(data))
            assert sum(counted) == end - start
    finally:
        os.close(fd)
    assert target.read_bytes() == data
    assert origin.requests["w.bin"] == 3
    conn = conns.get("http", origin.base.split("/")[2])
    assert (conn.pipe is not None) == (body_path == "splice")


def test_file_that_cannot_take_splice_falls_back_to_the_buffer(
    origin: FaultyOrigin, conns: Connections, tmp_path: Path
) -> None:
    if not hasattr(os, "splice"):
        pytest.skip("os.splice needs Linux")
    # The kernel refuses to splice into a file opened for appending (EINVAL); writing from
    # offset 0 of an empty one lands every byte where it belongs all the same.
    data = os.urandom(3 * MiB + 1)
    url = origin.add("w.bin", data)
    target = tmp_path / "w.bin"
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        counted = _get(conns, url, fd, 0, len(data), len(data))
    finally:
        os.close(fd)
    assert target.read_bytes() == data
    assert sum(counted) == len(data)
    assert conns.get("http", origin.base.split("/")[2]).pipe is None


def test_destination_filling_up_half_way_is_disk_full(
    origin: FaultyOrigin, conns: Connections, tmp_path: Path, body_path: str
) -> None:
    with small_tmpfs(tmp_path / "small", 2) as small:
        data = os.urandom(3 * MiB)
        url = origin.add("w.bin", data)
        fd = os.open(small / "w.bin", os.O_RDWR | os.O_CREAT)
        counted: list[int] = []
        try:
            os.ftruncate(fd, len(data))  # sparse: the space runs out only while writing
            with pytest.raises(DiskFullError, match=r"w\.bin: no space left"):
                _get(conns, url, fd, 0, len(data), len(data), counted)
            # What was counted is on disk and is a prefix of the object.
            written = sum(counted)
            assert 1 * MiB < written <= 2 * MiB
            assert os.pread(fd, written, 0) == data[:written]
        finally:
            os.close(fd)


def test_reset_mid_body_counts_only_what_was_written(
    origin: FaultyOrigin, conns: Connections, tmp_path: Path, body_path: str
) -> None:
    data = os.urandom(2 * MiB)
    url = origin.add("w.bin", data, Fault("reset", times=1, after=300_000))
    fd = os.open(tmp_path / "w.bin", os.O_RDWR | os.O_CREAT)
    counted: list[int] = []
    try:
        os.ftruncate(fd, len(data))
        with pytest.raises(transport.RetryableError):
            _get(conns, url, fd, 0, len(data), len(data), counted)
        written = sum(counted)
        assert 0 < written <= 300_000
        assert os.pread(fd, written, 0) == data[:written]
    finally:
        os.close(fd)


def test_origin_that_stops_sending_times_out(
    origin: FaultyOrigin, tmp_path: Path, body_path: str
) -> None:
    data = os.urandom(2 * MiB)
    url = origin.add("w.bin", data, Fault("stall", times=1, after=200_000))
    fd = os.open(tmp_path / "w.bin", os.O_RDWR | os.O_CREAT)
    counted: list[int] = []
    slow = Connections(timeout_s=0.3)
    began = time.monotonic()
    try:
        os.ftruncate(fd, len(data))
        with pytest.raises(transport.RetryableError, match=r"w\.bin: .*(timed out|unavailable)"):
            _get(slow, url, fd, 0, len(data), len(data), counted)
        assert time.monotonic() - began < STALL_S
        assert sum(counted) == 200_000
        assert os.pread(fd, 200_000, 0) == data[:200_000]
    finally:
        slow.close_all()
        os.close(fd)
