"""Reading request traces: the Azure format, other headers, stretching, and bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.trace import Trace, TraceError, load_trace

AZURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_azure_format_with_seven_fraction_digits(tmp_path: Path) -> None:
    trace = load_trace(
        write(
            tmp_path,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n"
            "2023-11-16 18:15:50.9951690,396,109\n"
            "2023-11-16 18:15:46.6805900,374,44\n",
        )
    )
    assert list(trace.input_tokens) == [374, 396]  # sorted by time
    assert list(trace.output_tokens) == [44, 109]
    assert trace.arrivals[0] == 0.0
    assert trace.arrivals[1] == pytest.approx(4.314579, abs=1e-6)


def test_seconds_and_other_column_names(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "time,prompt_tokens,completion_tokens\n10,5,6\n12.5,7,8\n"))
    assert list(trace.arrivals) == [0.0, 2.5]
    assert trace.duration_s == 5.0  # one mean gap past the last request


@pytest.mark.skipif(not AZURE.is_dir(), reason="the shared Azure trace is not on this machine")
def test_the_azure_conversation_trace_loads() -> None:
    trace = load_trace(AZURE / "azure_llm_2023_conv.csv")
    assert len(trace) == 19_366
    assert 3_400 < trace.duration_s < 3_600
    assert 5 < trace.mean_rate() < 6


def test_stretching_scales_time_and_loops_back_to_back() -> None:
    trace = Trace.of([(0.0, 1, 2), (10.0, 3, 4)], duration_s=20.0)
    twice = trace.stretched(time_scale=0.5, loops=2)
    assert list(twice.arrivals) == [0.0, 5.0, 10.0, 15.0]
    assert list(twice.input_tokens) == [1, 3, 1, 3]
    assert twice.duration_s == 20.0
    assert twice.mean_rate() == pytest.approx(2 * trace.mean_rate())
    with pytest.raises(ValueError, match="time scale"):
        trace.stretched(time_scale=0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "trace.csv: the trace is empty"),
        ("when,ContextTokens,GeneratedTokens\n1,2,3\n", "trace.csv:1: no time column"),
        ("time,ContextTokens,GeneratedTokens\n", "has a header but no requests"),
        (
            "time,ContextTokens,GeneratedTokens\n1,2,3\nyesterday,2,3\n",
            "trace.csv:3: time: expected an ISO date and time or seconds",
        ),
        (
            "time,ContextTokens,GeneratedTokens\n1,2,3\n2,-4,3\n",
            "trace.csv:3: ContextTokens: expected a whole number of tokens, 0 or more (got '-4')",
        ),
        ("time,ContextTokens,GeneratedTokens\n1,2\n", "trace.csv:2: 2 columns, the header has 3"),
    ],
)
def test_bad_rows_name_the_file_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TraceError) as caught:
        load_trace(write(tmp_path, text))
    assert message in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read the trace"):
        load_trace(tmp_path / "nope.csv")


def one_hour(requests: int = 360) -> Trace:
    """A request every 10 s for exactly one hour, sizes telling the requests apart."""
    return Trace.of([(i * 10.0, i + 1, 2 * i + 1) for i in range(requests)], duration_s=3600.0)


def test_stretched_to_whole_hours_repeats_every_request() -> None:
    trace = one_hour()
    day = trace.stretched_to_hours(24)
    assert day.duration_s == 24 * 3600.0
    assert len(day) == 24 * len(trace)
    assert list(day.input_tokens) == list(trace.input_tokens) * 24
    assert day.arrivals[len(trace)] == 3600.0  # the second loop starts one period in
    assert day.arrivals[-1] == 23 * 3600.0 + trace.arrivals[-1]
    assert all(b >= a for a, b in zip(day.arrivals, day.arrivals[1:], strict=False))


def test_stretched_to_fractional_hours_ends_part_way_into_a_loop() -> None:
    trace = one_hour()
    stretched = trace.stretched_to_hours(1.5)
    assert stretched.duration_s == 5400.0
    assert len(stretched) == len(trace) + len(trace) // 2  # the first half of the second loop
    assert stretched.arrivals[-1] == 3600.0 + 1790.0
    assert list(stretched.output_tokens[len(trace) :]) == list(trace.output_tokens[:180])
    quarter = trace.stretched_to_hours(0.25)
    assert quarter.duration_s == 900.0
    assert len(quarter) == 90  # 0, 10, ..., 890: the request at 900 s is past the end
    assert quarter.arrivals[-1] < 900.0


def test_stretched_to_hours_after_a_time_scale() -> None:
    # Twice as fast: a 30-minute trace, so two hours are four loops.
    fast = one_hour().stretched(time_scale=0.5)
    two = fast.stretched_to_hours(2)
    assert two.duration_s == 7200.0
    assert len(two) == 4 * 360
    assert two.mean_rate() == pytest.approx(2 * one_hour().mean_rate())


def test_stretched_to_hours_of_the_azure_trace_lasts_exactly_that() -> None:
    if not AZURE.is_dir():
        pytest.skip("the shared Azure trace is not on this machine")
    trace = load_trace(AZURE / "azure_llm_2023_conv.csv")
    day = trace.stretched_to_hours(24)
    assert day.duration_s == 86_400.0
    loops = 86_400.0 / trace.duration_s  # the recorded hour lasts a little less than 3600 s
    assert int(loops) * len(trace) < len(day) < (int(loops) + 1) * len(trace)
    assert day.arrivals[-1] < 86_400.0


@pytest.mark.parametrize("hours", [0, -1, float("nan"), float("inf")])
def test_stretched_to_hours_refuses_a_length_that_is_not_positive(hours: float) -> None:
    with pytest.raises(ValueError, match="hours must be a positive number"):
        one_hour().stretched_to_hours(hours)


def test_stretched_to_hours_refuses_an_empty_or_instant_trace() -> None:
    with pytest.raises(ValueError, match="an empty trace cannot be stretched to 2 h"):
        Trace.of([]).stretched_to_hours(2)
    with pytest.raises(ValueError, match="a trace of one instant"):
        Trace.of([(5.0, 1, 1)]).stretched_to_hours(1)
