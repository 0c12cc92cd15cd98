"""The config files shown in the README are valid: the documentation cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from agent.config import AgentConfig
from scheduler.config import SchedulerConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def _yaml_block(name: str) -> str:
    for block in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL):
        if block.startswith(f"# {name}\n"):
            return str(block)
    raise AssertionError(f"README has no yaml block starting with '# {name}'")


@pytest.mark.parametrize(
    ("name", "model"), [("agent.yaml", AgentConfig), ("scheduler.yaml", SchedulerConfig)]
)
def test_readme_config_examples_validate(
    name: str, model: type[AgentConfig | SchedulerConfig]
) -> None:
    data = yaml.safe_load(_yaml_block(name))
    assert isinstance(data, dict) and data
    model.model_validate(data)


def test_readme_spill_settings_validate_with_the_base_config() -> None:
    base = yaml.safe_load(_yaml_block("scheduler.yaml"))
    spill = yaml.safe_load(_yaml_block("scheduler.yaml (added to the fields above)"))
    config = SchedulerConfig.model_validate({**base, **spill})
    assert config.temporal is not None and config.clouds.aws is not None
    assert config.decide_every_s == config.report_interval_s


def test_readme_has_the_two_setup_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
