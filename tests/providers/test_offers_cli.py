"""``spillway offers``: the ranking an operator sees, through the real command-line entry point."""

from __future__ import annotations

import json

import pytest

from spillway.cli import main


def test_offers_table_for_eu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["offers", "H100-80GB:8", "--residency", "eu"]) == 0
    out = capsys.readouterr().out
    assert "8x H100-80GB" in out and "list prices taken 2025-07-01" in out
    for expected in ("p5.48xlarge", "eu-north-1", "a3-highgpu-8g", "Standard_ND96isr_H100_v5"):
        assert expected in out
    assert "us-east-1" not in out and "eu-west-2" not in out


def test_offers_json_is_ranked_and_filtered(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["offers", "L4:1", "--cloud", "aws,gcp", "--residency", "eu,uk", "--json"])
    assert code == 0
    offers = json.loads(capsys.readouterr().out)
    prices = [o["usd_per_hour"] for o in offers]
    assert prices == sorted(prices) and len(offers) > 5
    assert {o["cloud"] for o in offers} == {"aws", "gcp"}
    assert {o["residency"] for o in offers} == {"eu", "uk"}


def test_bad_input_exits_2_naming_what_exists(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["offers", "H100:8"]) == 2
    assert "unknown SKU 'H100'; the catalog has A100-80GB" in capsys.readouterr().err
    assert main(["offers", "L4:1", "--region", "moon-1"]) == 2
    assert "unknown region moon-1" in capsys.readouterr().err
    assert main(["offers", "H100-80GB:3"]) == 2
    assert "counts of 1, 8" in capsys.readouterr().err


def test_nothing_matching_exits_1_and_says_where_it_is_sold(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["offers", "L40S:4", "--residency", "ch"]) == 1
    assert "sold in residency groups apac, eu, uk, us" in capsys.readouterr().err
