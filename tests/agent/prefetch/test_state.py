"""Range bookkeeping and resume: merged intervals, gaps, malformed progress, and what a resumed
download trusts when the sidecar and a heartbeat disagree."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from agent.prefetch import SourceOptions, prefetch
from agent.prefetch.state import (
    STATE_DIR,
    add_interval,
    covered,
    intersect,
    merge_progress,
    missing,
    parse_ranges,
    prefix_end,
    ranges_json,
    write_json_atomic,
)
from tests.agent.prefetch.conftest import fast_tuning, small_tmpfs
from tests.agent.prefetch.faults import FaultyOrigin

MiB = 1024 * 1024


def test_intervals_merge_and_gaps() -> None:
    intervals: list[tuple[int, int]] = []
    for start, end in [(10, 20), (30, 40), (20, 30), (50, 60), (0, 5)]:
        intervals = add_interval(intervals, start, end)
    assert intervals == [(0, 5), (10, 40), (50, 60)]
    assert covered(intervals) == 45
    assert missing(70, intervals) == [(5, 10), (40, 50), (60, 70)]
    assert prefix_end(intervals) == 5
    assert prefix_end([(3, 9)]) == 0
    assert intersect([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]


def test_malformed_progress_is_dropped_not_trusted() -> None:
    raw = {
        "files": {
            "good": {"identity": "1|a|", "ranges": [[0, 10], [10, 20]]},
            "negative": {"identity": "x", "ranges": [[-5, 10]]},
            "reversed": {"identity": "x", "ranges": [[10, 5]]},
            "not-a-list": {"identity": "x", "ranges": "0-10"},
            "no-identity": {"ranges": [[0, 1]]},
        }
    }
    assert parse_ranges(raw) == {"good": ("1|a|", [(0, 20)])}
    assert parse_ranges(None) == {}
    assert parse_ranges(ranges_json({"f": ("i", [(0, 4)])})) == {"f": ("i", [(0, 4)])}


def test_merge_trusts_only_what_both_claim() -> None:
    sidecar = {"a": ("v1", [(0, 100)]), "b": ("v1", [(0, 10)])}
    hint = {"a": ("v1", [(0, 50), (80, 200)]), "b": ("v2", [(0, 99)]), "c": ("v1", [(0, 7)])}
    assert merge_progress(sidecar, hint) == {
        "a": ("v1", [(0, 50), (80, 100)]),
        "b": ("v2", [(0, 99)]),
        "c": ("v1", [(0, 7)]),
    }


def test_resume_with_a_hint_that_claims_too_much(origin: FaultyOrigin, tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    origin.add("w.bin", data)
    names = [f"w.bin {hashlib.sha256(data).hexdigest()}"]
    # A first run that got the first MiB, as an interrupted run leaves it.
    state = tmp_path / STATE_DIR
    (state / "partial").mkdir(parents=True)
    part = state / "partial" / "w.bin.part"
    part.write_bytes(data[:MiB] + bytes(3 * MiB))
    identity = f"{len(data)}|{''}|sha256={hashlib.sha256(data).hexdigest()}"
    (state / "progress.json").write_text(json.dumps(ranges_json({"w.bin": (identity, [(0, MiB)])})))
    hint = ranges_json({"w.bin": (identity, [(0, 2 * MiB)])})  # claims bytes never written
    result = prefetch(origin.base, tmp_path, SourceOptions(files=names), fast_tuning(), resume=hint)
    assert result.resumed_bytes == MiB
    assert result.fetched_bytes == 3 * MiB
    assert origin.served["w.bin"] == 3 * MiB
    assert (tmp_path / "w.bin").read_bytes() == data


def test_state_write_on_a_full_disk_keeps_the_previous_state(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", 1) as small:
        target = small / "progress.json"
        write_json_atomic(target, {"version": 1, "files": {}}, fsync=True)
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, bytes(65536))
            assert full.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        big = {"version": 1, "files": {"x": {"identity": "i", "ranges": [[0, 1]] * 50_000}}}
        with pytest.raises(OSError) as failed:
            write_json_atomic(target, big, fsync=True)
        assert failed.value.errno == errno.ENOSPC
        assert json.loads(target.read_text()) == {"version": 1, "files": {}}
        assert sorted(p.name for p in small.iterdir()) == ["filler", "progress.json"]
