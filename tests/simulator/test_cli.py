"""``spillway simulate`` from the command line: outputs, JSON, and bad input (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from simulator import load_trace
from spillway.cli import main
from tests.simulator.conftest import bursty_trace, policy


def write_inputs(
    tmp_path: Path, minutes: int = 10, quiet: float = 1.5, busy: float = 5.0
) -> tuple[Path, Path]:
    trace = bursty_trace(minutes=minutes, quiet=quiet, busy=busy)
    csv_path = tmp_path / "trace.csv"
    lines = ["timestamp,input_tokens,output_tokens"]
    lines += [
        f"{trace.arrivals[i]:.3f},{trace.input_tokens[i]},{trace.output_tokens[i]}"
        for i in range(len(trace))
    ]
    csv_path.write_text("\n".join(lines) + "\n")
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy().model_dump(mode="json", exclude_none=True)))
    (tmp_path / "sim.yaml").write_text("probe_requests: 2000\n")
    return csv_path, policy_path


def settings_args(tmp_path: Path) -> list[str]:
    return ["--settings", str(tmp_path / "sim.yaml")]


def test_table_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, pol = write_inputs(tmp_path)
    out = tmp_path / "out"
    code = main(
        [
            "simulate",
            "--trace",
            str(trace),
            "--policy",
            str(pol),
            "--reserved",
            "2",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    for name in ("reserved-only", "on-demand", "policy", "hindsight", "cheapest scenario"):
        assert name in printed
    assert "ranking, reserved at a 40% discount: 1." in printed
    assert "ranking, reserved at the on-demand price (0% discount): 1." in printed
    assert "tuned on the scored data itself" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "requests.csv",
        "simulation.json",
        "simulation.png",
    ]
    data = json.loads((out / "simulation.json").read_text())
    assert data["reserved"]["machines"] == 2
    # No managed endpoint in this policy: no managed-only scenario, and the note says so.
    assert set(data["scenarios"]) == {
        "reserved-only",
        "reserved-for-peak",
        "rent-only",
        "policy",
        "on-demand",
        "hindsight-bound",
    }
    assert any("no managed-only scenario" in n for n in data["notes"])


def test_json_with_a_stretched_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, pol = write_inputs(tmp_path, minutes=5)
    args = ["simulate", "--trace", str(trace), "--policy", str(pol), "--json", "--no-png"]
    args += ["--loops", "2", "--time-scale", "2", "--seed", "4", "--out", str(tmp_path / "o")]
    args += settings_args(tmp_path)
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trace"]["requests"] == 2 * len(bursty_trace(minutes=5))
    assert data["trace"]["duration_s"] == pytest.approx(2 * 2 * load_trace(trace).duration_s)
    assert not (tmp_path / "o" / "simulation.png").exists()


def test_hours_and_tuning_on_another_hour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace, pol = write_inputs(tmp_path, minutes=10, quiet=0.2, busy=0.5)
    args = ["simulate", "--trace", str(trace), "--policy", str(pol), "--json", "--no-png"]
    args += ["--hours", "2", "--tune-on", "hour:2", "--out", str(tmp_path / "o")]
    args += settings_args(tmp_path)
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trace"]["duration_s"] == 2 * 3600
    assert data["tuning"]["tuned_on_scored_data"] is False
    assert data["tuning"]["on"] == "hour 2 of the scored trace (part of the scored data)"
    assert data["tuning"]["duration_s"] == 3600
    assert any("tuned on hour 2 of the scored trace" in n for n in data["notes"])

    assert main([*args[:-4], "--tune-on", "hour:3", *args[-2:]]) == 2
    assert "--tune-on hour:3: the trace lasts 2.00 h" in capsys.readouterr().err
    assert main([*args[:-4], "--tune-on", "hour:x", *args[-2:]]) == 2
    assert "expected hour:N" in capsys.readouterr().err


def test_bad_inputs_exit_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace, pol = write_inputs(tmp_path, minutes=2)
    with trace.open("a") as handle:
        handle.write("99999,many,3\n")
    assert main(["simulate", "--trace", str(trace), "--policy", str(pol)]) == 2
    err = capsys.readouterr().err
    assert f"{trace}:" in err and "input_tokens: expected a whole number" in err

    trace, pol = write_inputs(tmp_path, minutes=2)
    code = main(["simulate", "--trace", str(trace), "--policy", str(pol), "--deployment", "x"])
    assert code == 2
    assert "no deployment 'x' in the policy; it has chat" in capsys.readouterr().err

    pol.write_text("deployments: {chat: {model: m}}\n")
    assert main(["simulate", "--trace", str(trace), "--policy", str(pol)]) == 2
    assert f"{pol}:1" in capsys.readouterr().err

    with pytest.raises(SystemExit) as caught:
        main(["simulate", "--trace", str(trace), "--policy", str(pol), "--time-scale", "0"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        main(["simulate", "--trace", str(trace), "--policy", str(pol), "--reserved", "-1"])
    assert caught.value.code == 2
    assert "expected a whole number of 0 or more, got -1" in capsys.readouterr().err
