"""The scheduler section of client configs: one address or several, and overrides of either."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.config import load_agent_config
from common.configfile import ConfigError
from common.schedulerlink import SchedulerEndpoint
from gateway.config import load_gateway_config
from tests.conftest import write_yaml


def endpoint(**fields: Any) -> SchedulerEndpoint:
    return SchedulerEndpoint.model_validate({"token_file": "t", **fields})


def test_one_address_or_several_give_the_same_list() -> None:
    assert endpoint(address="a.internal:50051").address_list == ("a.internal:50051",)
    several = endpoint(addresses=["b.internal:50051", "a.internal:50051", "[::1]:7"])
    assert several.address_list == ("b.internal:50051", "a.internal:50051", "[::1]:7")
    # An environment variable is one string: commas separate the schedulers.
    assert endpoint(addresses=" a:1, b:2 ,").address_list == ("a:1", "b:2")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"addresses": []}, "expected at least one host:port"),
        ({"addresses": ["a:1", "b:2", "a:1"]}, "a:1 is listed twice"),
        ({"addresses": ["a:1", "nope"]}, "'nope': expected host:port"),
        ({"addresses": ["a:1", "b:99999"]}, "'b:99999': expected host:port"),
        ({"address": "a:1", "addresses": ["b:2"]}, "address (one scheduler) or addresses"),
        ({}, "address (one scheduler) or addresses (several schedulers) is required"),
        ({"address": "a"}, "expected host:port"),
    ],
)
def test_bad_scheduler_lists_are_refused_with_the_reason(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as err:
        endpoint(**fields)
    assert message in str(err.value)


def _agent(tmp_path: Path, scheduler: dict[str, Any]) -> Path:
    return write_yaml(
        tmp_path / "agent.yaml",
        {
            "agent_id": "node-a",
            "scheduler": {"token_file": "secrets/node-a.token", **scheduler},
            "labels": {"pool": "p", "provider": "onprem", "region": "r"},
        },
    )


def test_the_config_file_names_the_line_of_a_bad_list(tmp_path: Path) -> None:
    path = _agent(tmp_path, {"addresses": ["a:1", "a:1"]})
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    (problem,) = err.value.problems
    assert problem.startswith(f"{path}:")
    assert "scheduler.addresses: " in problem and "a:1 is listed twice" in problem
    path = _agent(tmp_path, {"address": "a:1", "addresses": ["b:2"]})
    with pytest.raises(ConfigError, match=r"scheduler: .*not both"):
        load_agent_config(path)


def test_an_environment_override_takes_the_place_of_the_other_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _agent(tmp_path, {"address": "a.internal:50051"})
    monkeypatch.setenv("SPILLWAY_AGENT_SCHEDULER__ADDRESSES", "a.internal:50051,b.internal:50051")
    config = load_agent_config(path)
    assert config.scheduler.address is None
    assert config.scheduler.address_list == ("a.internal:50051", "b.internal:50051")
    assert config.scheduler.token_file == tmp_path / "secrets" / "node-a.token"
    # An override that is itself wrong names the variable.
    monkeypatch.setenv("SPILLWAY_AGENT_SCHEDULER__ADDRESSES", "a:1,a:1")
    with pytest.raises(ConfigError, match="environment variable SPILLWAY_AGENT_SCHEDULER__"):
        load_agent_config(path)
    # The other way round: one address over a file's list.
    monkeypatch.delenv("SPILLWAY_AGENT_SCHEDULER__ADDRESSES")
    path = _agent(tmp_path, {"addresses": ["a:1", "b:2"]})
    monkeypatch.setenv("SPILLWAY_AGENT_SCHEDULER__ADDRESS", "c:3")
    assert load_agent_config(path).scheduler.address_list == ("c:3",)
    # Both overridden at once is still "both given".
    monkeypatch.setenv("SPILLWAY_AGENT_SCHEDULER__ADDRESSES", "a:1")
    with pytest.raises(ConfigError, match="not both"):
        load_agent_config(path)


def test_the_gateway_takes_a_list_too(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "gateway.yaml",
        {
            "gateway_id": "gw-1",
            "policy_file": "policy.yaml",
            "scheduler": {
                "addresses": ["a.internal:50051", "b.internal:50051"],
                "token_file": "gw.token",
                "tls": {"ca_file": "ca.pem"},
            },
        },
    )
    config = load_gateway_config(path)
    assert config.scheduler.address_list == ("a.internal:50051", "b.internal:50051")
    assert config.scheduler.token_file == tmp_path / "gw.token"
    assert config.scheduler.tls is not None and config.scheduler.tls.ca_file == tmp_path / "ca.pem"
