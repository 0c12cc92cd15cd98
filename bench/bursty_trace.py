"""On/off bursty request traces for ``spillway simulate``, seeded and written as a trace CSV.

Time alternates between bursts and quiet spells, each length drawn from its own distribution.
A share of the requests (``background``) arrives uniformly over the quiet spells, the rest
uniformly over the bursts, so the trace has exactly ``round(mean_rate x duration)`` requests,
all inside ``[0, duration)``; within a phase arrivals are a Poisson process given its count.

Token sizes default to the Azure LLM inference trace of November 2023, code service
(``AzureLLMInferenceTrace_code.csv``, Azure Public Dataset, CC-BY 4.0; Patel et al.,
"Splitwise", ISCA 2024): 8,819 requests in 57 minutes (2.57 requests/s), prompts with a median
of 1,469 tokens (mean 2,048, up to 7,437), completions with a median of 13 (mean 28). They are
drawn from the percentiles below by linear interpolation between them.

With the defaults, the busiest 10-second bucket carries over 20 times the mean rate.

    .venv/bin/python bench/bursty_trace.py --out bursty.csv --duration 3600 --seed 7
    spillway simulate --trace bursty.csv ...

The CSV has the columns ``time`` (seconds from the start), ``input_tokens`` and
``output_tokens``, one of the headers :func:`simulator.trace.load_trace` reads.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Percentiles (0, 1, 5, 10, 20, ..., 90, 95, 99, 99.9, 100) of the Azure code trace's prompt
#: and completion sizes in tokens, computed from the published CSV.
# fmt: off
CODE_PERCENTILES: tuple[float, ...] = (
    0.0, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.9, 100.0,
)
CODE_INPUT_TOKENS: tuple[int, ...] = (
    3, 17, 75, 147, 386, 770, 1075, 1469, 1909, 2433, 3192, 5188, 7303, 7436, 7437, 7437,
)
CODE_OUTPUT_TOKENS: tuple[int, ...] = (
    6, 6, 6, 7, 8, 9, 11, 13, 16, 20, 29, 55, 90, 251, 825, 1899,
)
# fmt: on

#: The code trace's mean rate, requests per second.
CODE_MEAN_RATE = 2.57

KINDS = ("exp", "fixed", "uniform", "lognormal", "code")


class DistributionError(ValueError):
    """A distribution's text cannot be read."""


@dataclass(frozen=True)
class Distribution:
    """A positive random number: ``exp:MEAN``, ``fixed:VALUE``, ``uniform:LOW:HIGH``,
    ``lognormal:MEDIAN:SIGMA`` or, for token sizes, ``code`` (the Azure code trace's)."""

    kind: str
    params: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Distribution:
        kind, *rest = text.strip().split(":")
        arity = {"exp": 1, "fixed": 1, "uniform": 2, "lognormal": 2, "code": 0}
        if kind not in arity:
            raise DistributionError(f"{text!r}: expected one of {', '.join(KINDS)}")
        if len(rest) != arity[kind]:
            raise DistributionError(
                f"{text!r}: {kind} takes {arity[kind]} number(s) after the name, got {len(rest)}"
            )
        try:
            params = tuple(float(p) for p in rest)
        except ValueError:
            raise DistributionError(f"{text!r}: expected numbers after {kind}:") from None
        if not all(math.isfinite(p) and p >= 0 for p in params):
            raise DistributionError(f"{text!r}: expected finite numbers, 0 or more")
        if kind in ("exp", "lognormal") and params[0] <= 0:
            raise DistributionError(f"{text!r}: the {kind} mean or median must be positive")
        if kind == "uniform" and params[0] > params[1]:
            raise DistributionError(f"{text!r}: the low end is above the high end")
        return cls(kind, params)

    def sample(self, rng: random.Random, table: Sequence[float] = CODE_INPUT_TOKENS) -> float:
        p = self.params
        if self.kind == "exp":
            return rng.expovariate(1 / p[0])
        if self.kind == "fixed":
            return p[0]
        if self.kind == "uniform":
            return rng.uniform(p[0], p[1])
        if self.kind == "lognormal":
            return rng.lognormvariate(math.log(p[0]), p[1])
        return _from_percentiles(rng.random() * 100, table)

    def mean(self, table: Sequence[float] = CODE_INPUT_TOKENS) -> float:
        p = self.params
        if self.kind in ("exp", "fixed"):
            return p[0]
        if self.kind == "uniform":
            return (p[0] + p[1]) / 2
        if self.kind == "lognormal":
            return p[0] * math.exp(p[1] ** 2 / 2)
        # Piecewise linear between percentiles: each segment's mean is its midpoint.
        return sum(
            (CODE_PERCENTILES[i + 1] - CODE_PERCENTILES[i]) / 100 * (table[i] + table[i + 1]) / 2
            for i in range(len(CODE_PERCENTILES) - 1)
        )


def _from_percentiles(q: float, table: Sequence[float]) -> float:
    i = min(len(CODE_PERCENTILES) - 2, bisect.bisect_right(CODE_PERCENTILES, q) - 1)
    low, high = CODE_PERCENTILES[i], CODE_PERCENTILES[i + 1]
    return table[i] + (table[i + 1] - table[i]) * (q - low) / (high - low)


#: Bursts of 10 to 20 s every 5 to 15 minutes: regular enough that an hour of them peaks at
#: over 20x the mean in a 10 s bucket whatever the seed.
DEFAULT_ON = Distribution("uniform", (10.0, 20.0))
DEFAULT_OFF = Distribution("uniform", (300.0, 900.0))
DEFAULT_TOKENS = Distribution("code")
DEFAULT_BACKGROUND = 0.1


def bursts(
    duration_s: float, on: Distribution, off: Distribution, rng: random.Random
) -> list[tuple[float, float]]:
    """The bursts as (start, end) spans inside ``[0, duration_s)``; the trace opens part-way
    into a quiet spell, as if it had been running before."""
    spans: list[tuple[float, float]] = []
    now = rng.random() * off.sample(rng)
    while now < duration_s:
        length = on.sample(rng)
        if length > 0:
            spans.append((now, min(duration_s, now + length)))
        now += length + off.sample(rng)
    return spans


def _uniform_over(
    spans: Sequence[tuple[float, float]], count: int, rng: random.Random
) -> list[float]:
    """``count`` times spread uniformly over the union of ``spans`` (disjoint, sorted)."""
    ends: list[float] = []
    total = 0.0
    for start, end in spans:
        total += end - start
        ends.append(total)
    times: list[float] = []
    for _ in range(count):
        at = rng.random() * total
        i = min(len(spans) - 1, bisect.bisect_right(ends, at))
        start = spans[i][0]
        before = ends[i - 1] if i else 0.0
        times.append(start + (at - before))
    return times


def generate(
    duration_s: float = 3600.0,
    mean_rate: float = CODE_MEAN_RATE,
    *,
    on: Distribution = DEFAULT_ON,
    off: Distribution = DEFAULT_OFF,
    input_tokens: Distribution = DEFAULT_TOKENS,
    output_tokens: Distribution = DEFAULT_TOKENS,
    background: float = DEFAULT_BACKGROUND,
    seed: int = 1,
) -> list[tuple[float, int, int]]:
    """(arrival s, input tokens, output tokens) rows in arrival order, all before
    ``duration_s``; the same arguments give the same rows."""
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise ValueError(f"duration must be a positive number of seconds, got {duration_s:g}")
    if not math.isfinite(mean_rate) or mean_rate <= 0:
        raise ValueError(f"mean rate must be a positive number of requests/s, got {mean_rate:g}")
    if not 0 <= background < 1:
        raise ValueError(
            f"background must be a share from 0 up to (not including) 1, got {background:g}"
        )
    rng = random.Random(seed)
    on_spans = bursts(duration_s, on, off, rng)
    if not on_spans:
        raise ValueError(
            f"no burst started within {duration_s:g} s (quiet spells {off.kind}:"
            f"{':'.join(f'{p:g}' for p in off.params)}); lengthen the trace or shorten the spells"
        )
    quiet: list[tuple[float, float]] = []
    last = 0.0
    for start, end in on_spans:
        if start > last:
            quiet.append((last, start))
        last = end
    if last < duration_s:
        quiet.append((last, duration_s))
    total = round(mean_rate * duration_s)
    in_quiet = round(total * background) if quiet else 0
    times = _uniform_over(on_spans, total - in_quiet, rng)
    times += _uniform_over(quiet, in_quiet, rng)
    times.sort()
    rows: list[tuple[float, int, int]] = []
    for at in times:
        at = min(at, math.nextafter(duration_s, 0.0))
        prompt = max(1, round(input_tokens.sample(rng, CODE_INPUT_TOKENS)))
        completion = max(1, round(output_tokens.sample(rng, CODE_OUTPUT_TOKENS)))
        rows.append((at, prompt, completion))
    return rows


def write_csv(path: Path, rows: Sequence[tuple[float, int, int]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", "input_tokens", "output_tokens"])
        for at, prompt, completion in rows:
            writer.writerow([f"{at:.6f}", prompt, completion])


def peak_to_mean(arrivals: Sequence[float], duration_s: float, bucket_s: float = 10.0) -> float:
    """The busiest ``bucket_s`` bucket's rate over the mean rate."""
    if not arrivals or duration_s <= 0:
        return 0.0
    counts = [0] * max(1, math.ceil(duration_s / bucket_s))
    for at in arrivals:
        counts[min(len(counts) - 1, int(at // bucket_s))] += 1
    return max(counts) / bucket_s / (len(arrivals) / duration_s)


def _distribution(text: str) -> Distribution:
    try:
        return Distribution.parse(text)
    except DistributionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the trace CSV to write")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds (3600)")
    parser.add_argument(
        "--mean-rate",
        type=float,
        default=CODE_MEAN_RATE,
        help=f"requests/s over the whole trace ({CODE_MEAN_RATE}, the code trace's)",
    )
    parser.add_argument(
        "--on", type=_distribution, default=DEFAULT_ON, help="burst lengths, s (uniform:10:20)"
    )
    parser.add_argument(
        "--off", type=_distribution, default=DEFAULT_OFF, help="quiet spells, s (uniform:300:900)"
    )
    parser.add_argument(
        "--input-tokens", type=_distribution, default=DEFAULT_TOKENS, help="prompt sizes (code)"
    )
    parser.add_argument(
        "--output-tokens",
        type=_distribution,
        default=DEFAULT_TOKENS,
        help="completion sizes (code)",
    )
    parser.add_argument(
        "--background",
        type=float,
        default=DEFAULT_BACKGROUND,
        help=f"share of requests in the quiet spells ({DEFAULT_BACKGROUND})",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        rows = generate(
            args.duration,
            args.mean_rate,
            on=args.on,
            off=args.off,
            input_tokens=args.input_tokens,
            output_tokens=args.output_tokens,
            background=args.background,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    write_csv(args.out, rows)
    ratio = peak_to_mean([r[0] for r in rows], args.duration)
    print(
        f"{args.out}: {len(rows):,} requests over {args.duration:g} s "
        f"({len(rows) / args.duration:.2f}/s), busiest 10 s at {ratio:.1f}x the mean"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
