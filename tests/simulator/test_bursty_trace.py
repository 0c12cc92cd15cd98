"""The on/off bursty trace generator in bench/: seeded, bursty enough, and a trace the simulator
reads."""

from __future__ import annotations

import importlib.util
import random
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from simulator.trace import load_trace

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bursty_trace", ROOT / "bench" / "bursty_trace.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bursty_trace"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bt = _load()


def test_the_same_seed_gives_the_same_trace_and_another_seed_another() -> None:
    first = bt.generate(1800.0, 3.0, seed=11)
    assert first == bt.generate(1800.0, 3.0, seed=11)
    assert first != bt.generate(1800.0, 3.0, seed=12)


@pytest.mark.parametrize("seed", range(1, 11))
def test_the_busiest_ten_seconds_carry_over_twenty_times_the_mean(seed: int) -> None:
    rows = bt.generate(seed=seed)
    arrivals = [r[0] for r in rows]
    counts = [0] * 360
    for at in arrivals:
        counts[int(at // 10)] += 1
    mean = len(rows) / 3600.0
    assert max(counts) / 10 / mean > 20
    assert bt.peak_to_mean(arrivals, 3600.0) == pytest.approx(max(counts) / 10 / mean)


def test_exact_request_count_and_every_request_inside_the_duration() -> None:
    for duration, rate in ((3600.0, 2.57), (5400.0, 1.25), (86_400.0, 0.5)):
        rows = bt.generate(duration, rate, seed=4)
        assert len(rows) == round(duration * rate)
        assert all(0 <= r[0] < duration for r in rows)
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_the_background_share_arrives_outside_the_bursts() -> None:
    # generate draws the bursts first from its seeded stream, so the same seed gives these.
    spans = bt.bursts(3600.0, bt.DEFAULT_ON, bt.DEFAULT_OFF, random.Random(9))
    assert spans and all(10 <= end - start <= 20 for start, end in spans[:-1])
    rows = bt.generate(3600.0, 2.0, background=0.25, seed=9)
    inside = sum(1 for at, _, _ in rows if any(s <= at < e for s, e in spans))
    assert len(rows) - inside == round(len(rows) * 0.25)


def test_sizes_follow_the_azure_code_trace() -> None:
    rows = bt.generate(7200.0, 2.57, seed=3)
    prompts = [r[1] for r in rows]
    completions = [r[2] for r in rows]
    # The code trace: prompts median 1,469 (mean 2,048), completions median 13 (mean 28).
    assert 1300 < statistics.median(prompts) < 1650
    assert 1800 < statistics.mean(prompts) < 2300
    assert 11 <= statistics.median(completions) <= 15
    assert 22 < statistics.mean(completions) < 36
    assert min(prompts) >= 3 and max(prompts) <= 7437
    assert min(completions) >= 6 and max(completions) <= 1899


def test_other_distributions_are_honoured() -> None:
    rows = bt.generate(
        600.0,
        1.0,
        on=bt.Distribution.parse("fixed:30"),
        off=bt.Distribution.parse("fixed:60"),
        input_tokens=bt.Distribution.parse("fixed:100"),
        output_tokens=bt.Distribution.parse("uniform:5:9"),
        background=0.0,
        seed=2,
    )
    assert {r[1] for r in rows} == {100}
    assert {r[2] for r in rows} <= set(range(5, 10))
    spans = bt.bursts(
        600.0,
        bt.Distribution("fixed", (30.0,)),
        bt.Distribution("fixed", (60.0,)),
        random.Random(2),
    )
    assert all(any(s <= r[0] < e for s, e in spans) for r in rows)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("poisson:3", "expected one of exp, fixed, uniform, lognormal, code"),
        ("exp", "exp takes 1 number(s) after the name, got 0"),
        ("uniform:9:3", "the low end is above the high end"),
        ("exp:-2", "expected finite numbers, 0 or more"),
        ("lognormal:x:1", "expected numbers after lognormal:"),
    ],
)
def test_bad_distributions_say_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(bt.DistributionError, match="^'" + text.split(":")[0]) as caught:
        bt.Distribution.parse(text)
    assert message in str(caught.value)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="duration must be a positive number of seconds"):
        bt.generate(0.0)
    with pytest.raises(ValueError, match="mean rate must be a positive number"):
        bt.generate(60.0, -1.0)
    with pytest.raises(ValueError, match="background must be a share"):
        bt.generate(60.0, 1.0, background=1.0)
    with pytest.raises(ValueError, match="no burst started within 60 s"):
        bt.generate(60.0, 1.0, off=bt.Distribution.parse("fixed:1000"))


def test_the_command_writes_a_trace_load_trace_reads(tmp_path: Path) -> None:
    out = tmp_path / "bursty.csv"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bursty_trace.py"), "--out", str(out), "--seed", "5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "busiest 10 s at" in done.stdout
    rows = bt.generate(seed=5)
    trace = load_trace(out)
    assert len(trace) == len(rows)
    assert list(trace.input_tokens) == [r[1] for r in rows]
    assert list(trace.output_tokens) == [r[2] for r in rows]
    first = rows[0][0]
    assert trace.arrivals[-1] == pytest.approx(rows[-1][0] - first, abs=1e-5)
    # Loaded, the trace lasts one mean gap past its last request; stretched, exactly an hour.
    hour = trace.stretched_to_hours(1)
    assert hour.duration_s == 3600.0
    assert len(hour) >= len(rows)
    bad = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bursty_trace.py"), "--out", str(out), "--on", "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "--on: 'x': expected one of exp" in bad.stderr
