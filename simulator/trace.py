"""Request traces: a CSV of arrival time, input tokens and output tokens, held compactly.

Accepted headers (case-insensitive): a time column ``timestamp`` or ``time`` (ISO dates such as
``2023-11-16 18:15:46.6805900``, or seconds as a number), an input column ``contexttokens``,
``input_tokens`` or ``prompt_tokens``, and an output column ``generatedtokens``,
``output_tokens`` or ``completion_tokens``. The Azure LLM inference traces use the first names.
Times are made relative to the first request, and the trace lasts one mean gap past its last
request (so a looped trace keeps its rate). Rows need not be sorted; they are sorted by time.

A bad row is an error naming the file, the line and the column, and what was expected. Nothing
here reads anything but the trace file.
"""

from __future__ import annotations

import bisect
import csv
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from common.configfile import InputError

TIME_COLUMNS = ("timestamp", "time")
INPUT_COLUMNS = ("contexttokens", "input_tokens", "prompt_tokens")
OUTPUT_COLUMNS = ("generatedtokens", "output_tokens", "completion_tokens")


class TraceError(InputError):
    """The trace file cannot be read or a row is malformed."""


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order: times in seconds from the start, and token counts."""

    arrivals: array[float]
    input_tokens: array[int]
    output_tokens: array[int]
    #: How long the trace covers, in seconds (at least the last arrival).
    duration_s: float
    source: str = ""

    def __len__(self) -> int:
        return len(self.arrivals)

    @classmethod
    def of(
        cls,
        rows: Sequence[tuple[float, int, int]],
        duration_s: float | None = None,
        source: str = "",
    ) -> Trace:
        """A trace from (time, input tokens, output tokens) rows (tests, synthetic loads)."""
        ordered = sorted(rows, key=lambda r: r[0])
        start = ordered[0][0] if ordered else 0.0
        arrivals = array("d", (r[0] - start for r in ordered))
        last = arrivals[-1] if arrivals else 0.0
        return cls(
            arrivals,
            array("l", (r[1] for r in ordered)),
            array("l", (r[2] for r in ordered)),
            max(last, duration_s or 0.0),
            source,
        )

    def stretched(self, time_scale: float = 1.0, loops: int = 1) -> Trace:
        """Times multiplied by ``time_scale`` (2 halves the rate), then played ``loops`` times
        back to back (the period is the trace's duration, so the rate pattern repeats)."""
        if time_scale <= 0:
            raise ValueError(f"time scale must be positive, got {time_scale:g}")
        if loops < 1:
            raise ValueError(f"loops must be at least 1, got {loops}")
        period = self.duration_s * time_scale
        if loops > 1 and period <= 0:
            raise ValueError("a trace of one instant cannot be looped")
        arrivals: array[float] = array("d")
        scaled = array("d", (t * time_scale for t in self.arrivals))
        for loop in range(loops):
            offset = loop * period
            arrivals.extend(t + offset for t in scaled)
        return Trace(
            arrivals,
            self.input_tokens * loops,
            self.output_tokens * loops,
            period * loops,
            self.source,
        )

    def stretched_to_hours(self, hours: float) -> Trace:
        """The trace played back to back (period: its duration) and cut at exactly ``hours``:
        every request that arrives before ``hours`` x 3600 s, and a duration of exactly that.

        Apply a time scale first (``trace.stretched(time_scale).stretched_to_hours(n)``): the
        loop is of the trace as it is, so a fractional ``hours`` ends part-way into a loop."""
        if not math.isfinite(hours) or hours <= 0:
            raise ValueError(f"hours must be a positive number, got {hours:g}")
        if len(self) == 0:
            raise ValueError(f"an empty trace cannot be stretched to {hours:g} h")
        period = self.duration_s
        if period <= 0:
            raise ValueError(
                f"a trace of one instant cannot be stretched to {hours:g} h (its duration is 0 s)"
            )
        end = hours * 3600.0
        whole = int(end // period)
        arrivals: array[float] = array("d")
        for loop in range(whole):
            offset = loop * period
            arrivals.extend(t + offset for t in self.arrivals)
        inputs = self.input_tokens * whole
        outputs = self.output_tokens * whole
        offset = whole * period
        # The part-loop: requests of one more loop that still arrive before the end.
        count = bisect.bisect_left(self.arrivals, end - offset)
        arrivals.extend(t + offset for t in self.arrivals[:count])
        inputs.extend(self.input_tokens[:count])
        outputs.extend(self.output_tokens[:count])
        while arrivals and arrivals[-1] >= end:  # rounding in the offsets, never a late request
            arrivals.pop()
            inputs.pop()
            outputs.pop()
        return Trace(arrivals, inputs, outputs, end, self.source)

    def head(self, seconds: float) -> Trace:
        """The requests of the first ``seconds``."""
        count = bisect.bisect_left(self.arrivals, seconds)
        return Trace(
            self.arrivals[:count],
            self.input_tokens[:count],
            self.output_tokens[:count],
            min(self.duration_s, seconds),
            self.source,
        )

    def mean_rate(self) -> float:
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0


def _column(header: list[str], names: tuple[str, ...], path: Path, what: str) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise TraceError(
        f"{path}:1: no {what} column; expected one of {', '.join(names)} "
        f"(the header has {', '.join(h.strip() for h in header) or 'nothing'})"
    )


def _time(value: str) -> float:
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise ValueError("not a finite number")
        return number
    # datetime.fromisoformat takes at most 6 fractional digits; the Azure traces have 7.
    if "." in text:
        whole, fraction = text.rsplit(".", 1)
        digits = "".join(c for c in fraction if c.isdigit())
        text = f"{whole}.{digits[:6]}{fraction[len(digits) :]}"
    return datetime.fromisoformat(text).timestamp()


def load_trace(path: Path | str) -> Trace:
    """Read the CSV trace at ``path``; :class:`TraceError` names the line of a bad row."""
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc.strerror or exc}") from exc
    rows: list[tuple[float, int, int]] = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise TraceError(f"{path}: the trace is empty; expected a CSV header") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}:1: not a CSV file: {exc}") from exc
        t_col = _column(header, TIME_COLUMNS, path, "time")
        i_col = _column(header, INPUT_COLUMNS, path, "input tokens")
        o_col = _column(header, OUTPUT_COLUMNS, path, "output tokens")
        names = [h.strip() for h in header]
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) < len(header):
                    raise TraceError(
                        f"{path}:{line}: {len(row)} columns, the header has {len(header)}"
                    )
                try:
                    at = _time(row[t_col])
                except ValueError:
                    raise TraceError(
                        f"{path}:{line}: {names[t_col]}: expected an ISO date and time or "
                        f"seconds as a number (got {row[t_col]!r})"
                    ) from None
                counts = []
                for col in (i_col, o_col):
                    try:
                        value = int(row[col])
                    except ValueError:
                        value = -1
                    if value < 0:
                        raise TraceError(
                            f"{path}:{line}: {names[col]}: expected a whole number of tokens, "
                            f"0 or more (got {row[col]!r})"
                        )
                    counts.append(value)
                rows.append((at, counts[0], counts[1]))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}:{reader.line_num}: not a CSV file: {exc}") from exc
    if not rows:
        raise TraceError(f"{path}: the trace has a header but no requests")
    span = max(r[0] for r in rows) - min(r[0] for r in rows)
    # One mean gap after the last request, so that a looped trace keeps its rate.
    duration = span * len(rows) / (len(rows) - 1) if len(rows) > 1 else 0.0
    return Trace.of(rows, duration_s=duration, source=str(path))
