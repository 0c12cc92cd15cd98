"""The simulation's PNG: demand, capacity with rentals, TTFT, cumulative cost, and per scenario
its SLO share and total cost, for however many scenarios a run has.

It reads only plain data: the per-bucket series of :func:`simulator.report.series` (a scenario
may have none, such as a bound computed without replaying requests) and each scenario's
summary (``slo_attainment``, ``cost_usd.total``, ``cost_usd.overflow``, ``uses_reserved``, each
read defensively). Made to be read without guessing:

- legends sit beside the panels, never over data;
- scenarios with the same numbers all stay visible: each has its own colour, line style and
  marker, the ones drawn first are wider, and their markers fall at different minutes;
- minutes without requests are shaded in every time panel, so a gap in a latency line says why;
- rentals are markers on their scenario's capacity line, labelled with how many machines were
  launched in that minute when there were several.

Long runs are merged into at most :data:`MAX_POINTS` buckets before drawing. Nothing here
simulates or decides anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Most buckets drawn per series; longer runs are merged (sums for money and launches, the
#: mean for demand, the largest value for capacity and latency).
MAX_POINTS = 1500
#: Labels of the panels (the axes' ``label``, which tests and tools can look up).
PANELS = ("demand", "capacity", "latency", "cost", "slo", "spend")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
IDLE_COLOUR = "#d9d9d9"
IDLE_LABEL = "no requests"
LAUNCH_GID = "launch-count"


@dataclass(frozen=True)
class Style:
    colour: str
    linestyle: str
    marker: str
    linewidth: float
    zorder: float
    phase: int  # which bucket of each marker step carries the marker


def styles(names: Sequence[str]) -> dict[str, Style]:
    """One distinct look per scenario; earlier ones wider and lower, so that a later identical
    line leaves an edge of the one below it showing."""
    from matplotlib.colors import TABLEAU_COLORS

    palette = [str(c) for c in TABLEAU_COLORS.values()]
    out = {}
    count = max(1, len(names))
    for k, name in enumerate(names):
        out[name] = Style(
            colour=palette[k % len(palette)],
            linestyle=LINESTYLES[k % len(LINESTYLES)],
            marker=MARKERS[k % len(MARKERS)],
            linewidth=max(0.9, 3.2 - 2.2 * k / count),
            zorder=2.0 + k / count,
            phase=k,
        )
    return out


def downsample(data: Mapping[str, list[Any]], max_points: int = MAX_POINTS) -> dict[str, list[Any]]:
    """``data`` merged into at most ``max_points`` buckets."""
    n = len(data.get("t_s", ()))
    if n <= max_points:
        return {k: list(v) for k, v in data.items()}
    step = math.ceil(n / max_points)
    out: dict[str, list[Any]] = {}
    for key, values in data.items():
        groups = [values[i : i + step] for i in range(0, len(values), step)]
        if key == "t_s":
            out[key] = [g[0] for g in groups]
        elif key.endswith("_usd") or key == "launches":
            out[key] = [sum(g) for g in groups]
        elif key == "requests_per_s":
            out[key] = [sum(g) / len(g) for g in groups]
        else:
            out[key] = [_largest(g) for g in groups]
    return out


def _largest(values: Sequence[Any]) -> Any:
    present = [v for v in values if v is not None and not _nan(v)]
    return max(present) if present else None


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _floats(values: Sequence[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _get(summary: Mapping[str, Any] | None, *path: str) -> float | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or _nan(value):
        return None
    return float(value)


def idle_spans(t_s: Sequence[float], requests_per_s: Sequence[float]) -> list[tuple[float, float]]:
    """Runs of buckets without a request, as (start s, end s)."""
    if not t_s:
        return []
    width = t_s[1] - t_s[0] if len(t_s) > 1 else 60.0
    spans: list[tuple[float, float]] = []
    for t, rate in zip(t_s, requests_per_s, strict=False):
        if rate > 0:
            continue
        if spans and math.isclose(spans[-1][1], t):
            spans[-1] = (spans[-1][0], t + width)
        else:
            spans.append((t, t + width))
    return spans


def _through_end(
    hours: Sequence[float], values: Sequence[Any], step: float
) -> tuple[list[float], list[Any]]:
    """Bucket starts plus the end of the last bucket, and the last value repeated there."""
    if not hours:
        return [], []
    return [*hours, hours[-1] + step], [*values, values[-1]]


def cumulative_usd(data: Mapping[str, list[Any]]) -> list[float]:
    """Money spent by the end of each bucket: every ``*_usd`` series added up."""
    keys = [k for k in data if k.endswith("_usd")]
    n = len(data.get("t_s", ()))
    total, out = 0.0, []
    for b in range(n):
        total += sum(float(data[k][b] or 0.0) for k in keys)
        out.append(total)
    return out


def _outside_legend(ax: Axes, **kwargs: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_label() == "spend" and any(p.get_hatch() for p in ax.patches):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//"))
        labels.append("beyond the reservation")
    if handles:
        ax.legend(
            handles,
            labels,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0,
            fontsize=8,
            frameon=False,
            **kwargs,
        )


def render(
    all_series: Mapping[str, Mapping[str, list[Any]]],
    summaries: Mapping[str, Mapping[str, Any]],
    slo_s: float,
    title: str,
    slo_share: float = 0.99,
) -> Figure:
    """The figure, not yet saved (close it with ``matplotlib.pyplot.close``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries) + [n for n in all_series if n not in summaries]
    look = styles(names)
    drawn = {n: downsample(all_series[n]) for n in names if n in all_series}
    fig, grid = plt.subplot_mosaic(
        "DD;CC;LL;KK;SB",
        figsize=(13, 15),
        height_ratios=[1.0, 1.2, 1.2, 1.2, 1.3],
        layout="constrained",
    )
    axes = {panel: grid[key] for panel, key in zip(PANELS, "DCLKSB", strict=True)}
    for label, ax in axes.items():
        ax.set_label(label)
    timed = [axes[p] for p in ("demand", "capacity", "latency", "cost")]
    for ax in timed[1:]:
        ax.sharex(timed[0])
    fig.suptitle(title)
    first = next(iter(drawn.values()), None)
    step, marks, end = 1 / 60, 1, 0.0
    if first is not None:
        hours = [t / 3600 for t in first["t_s"]]
        step = hours[1] - hours[0] if len(hours) > 1 else step
        marks = max(len(names), len(hours) // 16)  # markers of different scenarios apart
        end = hours[-1] + step if hours else 0.0
        axes["demand"].step(
            *_through_end(hours, first["requests_per_s"], step), where="post", color="black",
            linewidth=0.8, label="requests/s",
        )  # fmt: skip
        for k, (quiet, busy) in enumerate(idle_spans(first["t_s"], first["requests_per_s"])):
            for ax in timed:
                ax.axvspan(
                    quiet / 3600,
                    busy / 3600,
                    color=IDLE_COLOUR,
                    alpha=0.6,
                    linewidth=0,
                    zorder=0.5,
                    label=IDLE_LABEL if k == 0 and ax is axes["demand"] else None,
                )
    slot = 0
    for name, data in drawn.items():
        s = look[name]
        hours = [t / 3600 for t in data["t_s"]]
        every = (s.phase % marks, marks)
        common: dict[str, Any] = {
            "color": s.colour,
            "linestyle": s.linestyle,
            "linewidth": s.linewidth,
            "zorder": s.zorder,
            "marker": s.marker,
            "markersize": 4,
            "markevery": every,
        }
        serving = [
            (r or 0) + (x or 0)
            for r, x in zip(data["reserved_replicas"], data["rented_replicas"], strict=False)
        ]
        # Each bucket drawn across its whole minute, the last one too.
        axes["capacity"].step(
            *_through_end(hours, serving, step), where="post", label=name, **common
        )
        if any(data.get("launches") or ()):
            _launches(axes["capacity"], name, hours, serving, data["launches"], s, slot)
            slot += 1
        p99 = _floats(data["ttft_p99_s"])
        axes["latency"].plot(
            *_through_end(hours, p99, step), drawstyle="steps-post", label=f"{name} p99", **common
        )
        spent = [0.0, *cumulative_usd(data)]  # by the end of each bucket
        axes["cost"].plot([0.0, *(h + step for h in hours)], spent, label=name, **common)
    for name in names:
        total = _get(summaries.get(name), "cost_usd", "total")
        if name not in drawn and total is not None:  # a bound without series: where it ends
            s = look[name]
            axes["cost"].plot(
                [end], [total], linestyle="none", marker=s.marker, markersize=9, color=s.colour,
                zorder=s.zorder + 1, clip_on=False, label=f"{name} (total only)",
            )  # fmt: skip
    if end > 0:
        axes["demand"].set_xlim(0.0, end)
    axes["demand"].set_ylabel("requests/s")
    axes["capacity"].set_ylabel("replicas serving")
    axes["capacity"].margins(y=0.15)  # room for the rental counts above the lines
    axes["latency"].axhline(
        slo_s, color="black", linestyle="--", linewidth=0.8, label="TTFT target"
    )
    if any(not all(math.isnan(v) for v in _floats(d["ttft_p99_s"])) for d in drawn.values()):
        axes["latency"].set_yscale("log")
    axes["latency"].set_ylabel("TTFT p99 per minute (s)")
    axes["cost"].set_ylabel("cumulative cost ($)")
    axes["cost"].set_xlabel("hours")
    _bars(axes["slo"], axes["spend"], names, summaries, look, slo_share)
    for ax in axes.values():
        _outside_legend(ax)
    return fig


def _launches(
    ax: Axes,
    name: str,
    hours: Sequence[float],
    serving: Sequence[int],
    launches: Sequence[int] | None,
    s: Style,
    slot: int,
) -> None:
    """Each bucket with rentals: a marker on the scenario's line, with the count when several;
    the ``slot``-th scenario with rentals is shifted right by ``slot`` marker widths, so that
    scenarios renting at the same minute show side by side."""
    if not launches:
        return
    from matplotlib.transforms import offset_copy

    root = ax.get_figure(root=True)
    assert root is not None
    shift = offset_copy(ax.transData, fig=root, x=6.0 * slot, y=0.0, units="points")
    xs, ys = [], []
    for h, y, count in zip(hours, serving, launches, strict=False):
        if not count:
            continue
        xs.append(h)
        ys.append(y)
        if count > 1:
            text = ax.annotate(
                f"x{count}",
                (h, y),
                xytext=(3 + 6.0 * slot, 5),
                textcoords="offset points",
                fontsize=7,
                color=s.colour,
                zorder=s.zorder + 2,
            )
            text.set_gid(LAUNCH_GID)
    if xs:
        ax.plot(
            xs, ys, linestyle="none", marker="^", markersize=7, markeredgecolor="black",
            markeredgewidth=0.5, color=s.colour, zorder=s.zorder + 1, clip_on=False,
            transform=shift, label=f"{name}: machines rented (xN: N at once)",
        )  # fmt: skip


def _bars(
    slo_ax: Axes,
    spend_ax: Axes,
    names: Sequence[str],
    summaries: Mapping[str, Mapping[str, Any]],
    look: Mapping[str, Style],
    slo_share: float,
) -> None:
    positions = list(range(len(names)))
    shares, totals, overflows = [], [], []
    for name in names:
        summary = summaries.get(name)
        share = _get(summary, "slo_attainment")
        total = _get(summary, "cost_usd", "total")
        overflow = _get(summary, "cost_usd", "overflow")
        reserved = _get(summary, "cost_usd", "reserved")
        if overflow is None and total is not None and reserved is not None:
            overflow = total - reserved
        if overflow is None and summary is not None and summary.get("uses_reserved") is False:
            overflow = total  # without a reservation everything is beyond it
        shares.append(math.nan if share is None else share * 100)
        totals.append(math.nan if total is None else total)
        overflows.append(0.0 if overflow is None or total is None else min(overflow, total))
    colours = [look[n].colour for n in names]
    slo_ax.bar(positions, shares, color=colours, edgecolor="black", linewidth=0.5)
    slo_ax.axhline(slo_share * 100, color="black", linestyle="--", linewidth=0.8,
                   label=f"target: {slo_share:.0%} within the TTFT target")  # fmt: skip
    low = min((v for v in shares if not math.isnan(v)), default=0.0)
    slo_ax.set_ylim(max(0.0, min(low, slo_share * 100) - 5), 100.5)
    slo_ax.set_ylabel("requests within the TTFT target (%)")
    base = [
        t - o if not math.isnan(t) else math.nan for t, o in zip(totals, overflows, strict=True)
    ]
    spend_ax.bar(positions, base, color=colours, edgecolor="black", linewidth=0.5)
    spend_ax.bar(
        positions, overflows, bottom=base, color=colours, edgecolor="black", linewidth=0.5,
        hatch="//", alpha=0.6,
    )  # fmt: skip
    spend_ax.set_ylabel("total cost ($)")
    for ax, values, percent in ((slo_ax, shares, True), (spend_ax, totals, False)):
        for x, v in zip(positions, values, strict=True):
            text = "n/a" if math.isnan(v) else f"{v:.1f}%" if percent else _usd(v)
            y = ax.get_ylim()[0] if math.isnan(v) else v
            ax.annotate(text, (x, y), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
        reserving = [bool((summaries.get(n) or {}).get("uses_reserved")) for n in names]
        labels = [f"{n} *" if r else n for n, r in zip(names, reserving, strict=True)]
        ax.set_xticks(positions, labels, rotation=35, ha="right", fontsize=8)
        if any(reserving):
            ax.set_xlabel("* uses the reserved GPUs", fontsize=8)


def _usd(value: float) -> str:
    return f"${value:,.0f}" if abs(value) >= 100 else f"${value:,.2f}"


def plot(
    path: Path,
    all_series: Mapping[str, Mapping[str, list[Any]]],
    results: Mapping[str, Any] | None,
    slo_s: float,
    title: str,
    summaries: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write the figure to ``path`` (PNG). ``summaries`` (each scenario's, as in the JSON) give
    the bars; without them only the total cost is read from ``results``."""
    import matplotlib.pyplot as plt

    if summaries is None:
        summaries = _from_results(results or {})
    fig = render(all_series, summaries, slo_s, title)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _from_results(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What the results say without their summaries: the total cost (the SLO share is n/a)."""
    return {
        name: {"cost_usd": {"total": getattr(result, "cost_total", None)}}
        for name, result in results.items()
    }
