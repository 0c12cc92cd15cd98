"""The simulation's figure, checked through matplotlib's own objects (never pixels): panels,
legends beside the data, identical scenarios both visible, idle minutes shaded, rentals counted."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.patches import Polygon, Rectangle
from matplotlib.text import Annotation

from simulator import figure, report, simulate
from simulator.figure import IDLE_LABEL, LAUNCH_GID, PANELS, downsample, plot, render
from tests.simulator.conftest import bursty_trace, policy, settings

MINUTES = 30
IDLE = range(10, 14)  # minutes 10 to 13 have no request


def run_series(
    *, idle: Sequence[int] = IDLE, launches: dict[int, int] | None = None, extra: float = 0.0
) -> dict[str, list[Any]]:
    """Per-minute series as :func:`simulator.report.series` gives them."""
    rate = [0.0 if m in idle else 2.0 + (m % 5) for m in range(MINUTES)]
    rented = [2 if 15 <= m < 25 else 0 for m in range(MINUTES)]
    counts = [0] * MINUTES
    for minute, count in (launches or {}).items():
        counts[minute] = count
    return {
        "t_s": [m * 60.0 for m in range(MINUTES)],
        "requests_per_s": rate,
        "reserved_replicas": [2] * MINUTES,
        "rented_replicas": rented,
        "rented_machines": rented,
        "launches": counts,
        "ttft_p50_s": [None if m in idle else 0.3 for m in range(MINUTES)],
        "ttft_p99_s": [None if m in idle else 0.9 + extra for m in range(MINUTES)],
        "reserved_usd": [0.5] * MINUTES,
        "rented_usd": [0.25 * r for r in rented],
    }


def summary(share: float, total: float, overflow: float, uses_reserved: bool) -> dict[str, Any]:
    return {
        "slo_attainment": share,
        "uses_reserved": uses_reserved,
        "cost_usd": {"total": total, "overflow": overflow},
    }


@pytest.fixture
def drawn() -> Iterator[Figure]:
    """Four scenarios: ``policy`` and ``rent-only`` identical, and a bound with no series."""
    same = run_series(launches={15: 3, 22: 1})
    series = {
        "reserved-only": run_series(extra=2.0),
        "rent-only": same,
        "policy": {k: list(v) for k, v in same.items()},
        "on-demand": run_series(launches={0: 2}, extra=0.5),
    }
    summaries = {
        "reserved-only": summary(0.9, 15.0, 0.0, True),
        "rent-only": summary(0.995, 20.0, 5.0, True),
        "policy": summary(0.995, 20.0, 5.0, True),
        "on-demand": summary(0.97, 18.0, 18.0, False),
        "hindsight-bound": summary(0.999, 17.5, 2.5, True),
    }
    fig = render(series, summaries, 2.0, "test run")
    fig.canvas.draw()
    yield fig
    plt.close(fig)


def panels(fig: Figure) -> dict[str, Axes]:
    return {str(ax.get_label()): ax for ax in fig.axes}


def xs(line: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(line.get_xdata(), dtype=float)]


def ys(line: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(line.get_ydata(), dtype=float)]


def legend_of(ax: Axes) -> Legend:
    found = ax.get_legend()
    assert found is not None
    return found


def lines(ax: Axes, label: str) -> list[Line2D]:
    return [line for line in ax.get_lines() if line.get_label() == label]


def test_every_panel_is_there_with_data(drawn: Figure) -> None:
    axes = panels(drawn)
    assert set(PANELS) <= set(axes)
    for name in ("capacity", "latency", "cost"):
        assert len(axes[name].get_lines()) >= 4
    # The bars: one per scenario in both bar panels, the bound included.
    for name in ("slo", "spend"):
        labels = [t.get_text() for t in axes[name].get_xticklabels()]
        assert [label.removesuffix(" *") for label in labels] == [
            "reserved-only",
            "rent-only",
            "policy",
            "on-demand",
            "hindsight-bound",
        ]
    assert labels[1] == "rent-only *" and labels[3] == "on-demand"  # * uses the reservation
    heights = [p.get_height() for p in axes["slo"].patches if isinstance(p, Rectangle)]
    assert heights[:5] == pytest.approx([90.0, 99.5, 99.5, 97.0, 99.9])
    # The reservation's share and the overflow stacked: 15 + 0, 15 + 5, 15 + 5, 0 + 18, 15 + 2.5.
    bars = [p for p in axes["spend"].patches if isinstance(p, Rectangle)]
    tops = [b.get_y() + b.get_height() for b in bars[5:10]]
    assert tops == pytest.approx([15.0, 20.0, 20.0, 18.0, 17.5])
    assert [b.get_height() for b in bars[5:10]] == pytest.approx([0.0, 5.0, 5.0, 18.0, 2.5])


def test_legends_never_cover_a_data_area(drawn: Figure) -> None:
    renderer = drawn.canvas.get_renderer()  # type: ignore[attr-defined]
    legends = [legend_of(ax) for ax in drawn.axes if ax.get_legend() is not None]
    assert len(legends) >= 5
    areas = [ax.get_window_extent(renderer) for ax in drawn.axes]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for area in areas:
            overlap_w = min(box.x1, area.x1) - max(box.x0, area.x0)
            overlap_h = min(box.y1, area.y1) - max(box.y0, area.y0)
            assert overlap_w <= 0 or overlap_h <= 0, (legend, area)
        # ... and inside the figure, not cut off.
        assert box.x1 <= drawn.bbox.x1 + 1 and box.y0 >= drawn.bbox.y0 - 1


def test_identical_scenarios_are_both_visible(drawn: Figure) -> None:
    axes = panels(drawn)
    for panel, suffix in (("capacity", ""), ("latency", " p99"), ("cost", "")):
        (low,) = lines(axes[panel], "rent-only" + suffix)
        (high,) = lines(axes[panel], "policy" + suffix)
        assert xs(low) == xs(high)  # the same numbers ...
        assert [v for v in ys(low) if not math.isnan(v)] == [
            v for v in ys(high) if not math.isnan(v)
        ]
        for line in (low, high):
            alpha = line.get_alpha()
            assert line.get_visible() and (alpha is None or alpha > 0)
        # ... drawn apart: colour, dash and marker differ, the lower one is wider, and their
        # markers fall on different buckets.
        assert low.get_color() != high.get_color()
        assert low.get_linestyle() != high.get_linestyle()
        assert low.get_marker() != high.get_marker()
        assert low.get_zorder() < high.get_zorder()
        assert low.get_linewidth() > high.get_linewidth()
        assert low.get_markevery() != high.get_markevery()
    # In the bar panels, side by side.
    slo_bars = [p for p in axes["slo"].patches if isinstance(p, Rectangle)][:5]
    assert slo_bars[1].get_height() == slo_bars[2].get_height()
    assert slo_bars[1].get_x() != slo_bars[2].get_x()


def test_minutes_without_requests_are_shaded_in_every_time_panel(drawn: Figure) -> None:
    axes = panels(drawn)
    for name in ("demand", "capacity", "latency", "cost"):
        spans = [
            p for p in axes[name].patches if isinstance(p, (Rectangle, Polygon)) and _is_span(p)
        ]
        assert len(spans) == 1, name
        x0, x1 = _x_extent(spans[0])
        assert x0 == pytest.approx(10 / 60) and x1 == pytest.approx(14 / 60)
    labels = [t.get_text() for t in legend_of(axes["demand"]).get_texts()]
    assert IDLE_LABEL in labels


def test_no_shading_when_every_minute_has_requests() -> None:
    fig = render({"policy": run_series(idle=())}, {"policy": summary(1, 1, 0, True)}, 2, "t")
    try:
        assert not [p for ax in fig.axes for p in ax.patches if _is_span(p)]
    finally:
        plt.close(fig)


def test_several_rentals_in_one_minute_are_counted(drawn: Figure) -> None:
    axes = panels(drawn)
    counts = [
        t for t in axes["capacity"].texts if isinstance(t, Annotation) and t.get_gid() == LAUNCH_GID
    ]
    # policy and rent-only: 3 at minute 15 (one at minute 22 gets a marker only); on-demand 2.
    assert sorted((t.get_text(), round(t.xy[0] * 60)) for t in counts) == [
        ("x2", 0),
        ("x3", 15),
        ("x3", 15),
    ]
    (markers,) = lines(axes["capacity"], "policy: machines rented (xN: N at once)")
    assert [round(x * 60) for x in xs(markers)] == [15, 22]
    assert markers.get_linestyle() == "None"
    # rent-only rents the same machines at the same minutes: its markers sit beside policy's.
    (beside,) = lines(axes["capacity"], "rent-only: machines rented (xN: N at once)")
    at = markers.get_transform().transform(markers.get_xydata())
    other = beside.get_transform().transform(beside.get_xydata())
    assert all(abs(a[0] - b[0]) >= 4 for a, b in zip(at, other, strict=True))


def test_a_scenario_without_series_still_shows_its_total(drawn: Figure) -> None:
    axes = panels(drawn)
    (point,) = lines(axes["cost"], "hindsight-bound (total only)")
    assert ys(point) == [17.5]
    assert xs(point) == pytest.approx([MINUTES / 60])


def test_cumulative_cost_adds_every_usd_series() -> None:
    data = run_series()
    data["managed_usd"] = [0.1] * MINUTES
    spent = figure.cumulative_usd(data)
    assert spent[-1] == pytest.approx(0.5 * 30 + 0.5 * 10 + 0.1 * 30)
    assert all(b >= a for a, b in itertools.pairwise(spent))


def test_long_runs_are_merged_before_drawing() -> None:
    minutes = 3 * 24 * 60
    data: dict[str, list[Any]] = {
        "t_s": [m * 60.0 for m in range(minutes)],
        "requests_per_s": [float(m % 7) for m in range(minutes)],
        "rented_replicas": [m % 4 for m in range(minutes)],
        "launches": [1 if m % 97 == 0 else 0 for m in range(minutes)],
        "ttft_p99_s": [None if m % 3 else 1.0 + m % 5 for m in range(minutes)],
        "rented_usd": [0.01] * minutes,
    }
    merged = downsample(data, 1500)
    assert len(merged["t_s"]) <= 1500
    assert merged["t_s"][1] == 3 * 60.0  # three minutes per point
    assert sum(merged["launches"]) == sum(data["launches"])
    assert sum(merged["rented_usd"]) == pytest.approx(sum(data["rented_usd"]))
    assert max(merged["rented_replicas"]) == 3
    assert merged["requests_per_s"][0] == pytest.approx((0 + 1 + 2) / 3)
    assert downsample(data, minutes)["launches"] == data["launches"]  # short enough: as it is


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "simulation.png"
    plot(
        path, {"policy": run_series()}, None, 2.0, "t", summaries={"policy": summary(1, 2, 1, True)}
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()  # closed


def test_a_simulation_spends_per_minute_what_it_costs_in_total(tmp_path: Path) -> None:
    sim = simulate(policy(), bursty_trace(minutes=20), settings())
    rentals = 0
    for name, result in sim.results.items():
        data = report.series(result)
        spent = sum(sum(v) for k, v in data.items() if k.endswith("_usd"))
        assert spent == pytest.approx(result.cost_total, rel=1e-9), name
        assert figure.cumulative_usd(data)[-1] == pytest.approx(result.cost_total, rel=1e-9)
        launched = [e for e in result.cluster.events if e.kind == "launch"]
        assert sum(data["launches"]) == len(launched)
        rentals += len(launched)
    assert rentals > 0  # the burst rents machines, so the figure has markers to draw
    written = sim.write(tmp_path, requests=False)
    assert tmp_path / "simulation.png" in written
    assert (tmp_path / "simulation.png").read_bytes()[:4] == b"\x89PNG"
    assert not plt.get_fignums()


def _is_span(patch: Any) -> bool:
    grey = matplotlib.colors.to_rgb(figure.IDLE_COLOUR)
    return bool(patch.get_facecolor()[:3] == pytest.approx(grey))


def _x_extent(patch: Rectangle | Polygon) -> tuple[float, float]:
    if isinstance(patch, Rectangle):
        return patch.get_x(), patch.get_x() + patch.get_width()
    xs = [float(x) for x, _ in patch.get_xy()]
    return min(xs), max(xs)
