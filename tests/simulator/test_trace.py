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
