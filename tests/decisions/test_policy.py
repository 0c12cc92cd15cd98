"""The policy file: the example is valid, and every mistake is reported with its line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.configfile import ConfigError
from decisions.policycheck import check_policy, load_policy, policy_schema

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"


def test_example_policy_is_valid() -> None:
    policy = load_policy(EXAMPLE)
    assert list(policy.deployments) == ["chat-eu", "summarize"]
    assert policy.deployments["chat-eu"].spillover.residency == "eu"
    assert policy.deployments["summarize"].spillover.residency is None


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


BASE = """\
credentials:
  aws: {profile: spillway}
deployments:
  chat:
    model: m
    weights: s3://bucket/m/
    sku: H100-80GB
    gpus: 8
    pools: [reserved-eu]
    max_replicas: 4
    autoscaling: {target: 4}
    spillover: {enabled: true, providers: [aws], residency: eu, max_spilled_replicas: 2}
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "sku: H100-80GB",
            "sku: H999",
            ":7: deployments.chat.sku: unknown SKU 'H999'; "
            "the catalog has A100-80GB, A10G, H100-80GB, H200, L4, L40S",
        ),
        (
            "max_replicas: 4",
            "max_replicas: 4\n    min_replicas: 5",
            ":4: deployments.chat: min_replicas (5) is above max_replicas (4)",
        ),
        (
            "residency: eu",
            "residency: me",
            ":12: deployments.chat.spillover.residency: "
            "no region of residency group 'me' sells 8x H100-80GB on aws",
        ),
        (
            "residency: eu",
            "residency: mars",
            ":12: deployments.chat.spillover.residency: unknown residency group 'mars'",
        ),
        (
            "gpus: 8",
            "gpus: 3",
            ":8: deployments.chat.gpus: "
            "clouds sell H100-80GB in machines of 1, 8 GPUs; a spilled replica of 3 must fit one",
        ),
        (
            "profile: spillway",
            "aws_secret_access_key: abc",
            ":2: credentials.aws: aws_secret_access_key: secrets may not be written",
        ),
        (
            "profile: spillway",
            "env: [AKIAABCDEFGHIJKLMNOP]",
            ":2: credentials.aws.env.0: this looks like an AWS access key id",
        ),
        ("model: m", "model: m\n    colour: blue", ":6: deployments.chat.colour: unknown field"),
        (
            "max_replicas: 4",
            "max_replicas: 4\n    slo: {saturated_queue_age: 1.5}",
            ":11: deployments.chat.slo.saturated_queue_age: Input should be less than or equal "
            "to 1",
        ),
        (
            "autoscaling: {target: 4}",
            "autoscaling: {target: 4, costs: {release_ratio: 0.5}}",
            ":11: deployments.chat.autoscaling.costs.release_ratio: Input should be greater "
            "than or equal to 1",
        ),
    ],
)
def test_each_mistake_is_reported_with_line_and_field(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in BASE
    path = _write(tmp_path, BASE.replace(old, new))
    result = check_policy(path)
    assert result.policy is None
    assert any(
        expected.split(":", 2)[2] in e and e.startswith(f"{path}{expected.split(' ')[0]}")
        for e in result.errors
    ), result.errors


def test_a_queue_timeout_shorter_than_the_saturation_age_is_a_note(tmp_path: Path) -> None:
    """Requests time out before the queue's age says saturated: usable (a queue with no room
    scales up at once), but worth saying."""
    text = BASE.replace(
        "max_replicas: 4",
        "max_replicas: 4\n    slo:\n      ttft_s: 40\n      saturated_queue_age: 0.75",
    )
    result = check_policy(_write(tmp_path, text))
    assert result.policy is not None and not result.errors
    assert any(
        ":13: deployments.chat.slo.saturated_queue_age: 0.75 x ttft_s 40s = 30s is not below "
        "gateway.queue_timeout_s (30s)" in n
        for n in result.notes
    ), result.notes


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = BASE.replace("sku: H100-80GB", "sku: H999").replace(
        "model: m", "model: m\n    colour: x"
    )
    result = check_policy(_write(tmp_path, text))
    assert len(result.errors) == 2
    assert "colour" in result.errors[0] and "H999" in result.errors[1]
    with pytest.raises(ConfigError):
        load_policy(tmp_path / "policy.yaml")


def test_shared_pool_is_a_note_not_an_error(tmp_path: Path) -> None:
    data = yaml.safe_load(BASE)
    data["deployments"]["other"] = dict(data["deployments"]["chat"])
    result = check_policy(_write(tmp_path, yaml.safe_dump(data, sort_keys=False)))
    assert result.errors == []
    assert result.policy is not None
    assert len(result.notes) == 1
    assert "pool 'reserved-eu' serves chat, other" in result.notes[0]


def test_group_named_like_catalog_group_may_only_narrow_it(tmp_path: Path) -> None:
    text = "residency_groups:\n  eu: {aws: [us-east-1]}\n" + BASE
    result = check_policy(_write(tmp_path, text))
    assert any(
        ":2: residency_groups.eu.aws.0: aws us-east-1 is in the catalog's residency group 'us'" in e
        for e in result.errors
    ), result.errors


def test_schema_names_the_fields() -> None:
    schema = policy_schema()
    assert "deployments" in schema["properties"]
    assert "Deployment" in schema["$defs"]


def test_cli_check_and_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spillway.cli import main

    assert main(["policy", "check", str(EXAMPLE)]) == 0
    bad = _write(tmp_path, BASE.replace("sku: H100-80GB", "sku: H999"))
    assert main(["policy", "check", str(bad)]) == 2
    assert f"{bad}:7: deployments.chat.sku: unknown SKU" in capsys.readouterr().err
    assert main(["policy", "schema"]) == 0
    assert '"deployments"' in capsys.readouterr().out


MANAGED = """\
    managed:
      - name: hosted
        base_url: https://llm.example.com/v1
        residency_group: {group}
        api_key_env: {env}
        usd_per_million_input_tokens: 0.5
        usd_per_million_output_tokens: {price}
        max_concurrency: 8
"""


def _with_managed(tmp_path: Path, group: str = "eu", env: str = "KEY", price: str = "1.5") -> Path:
    return _write(tmp_path, BASE + MANAGED.format(group=group, env=env, price=price))


def test_a_managed_endpoint_inside_the_lock_is_accepted(tmp_path: Path) -> None:
    policy = load_policy(_with_managed(tmp_path))
    endpoint = policy.deployments["chat"].managed[0]
    assert endpoint.base_url == "https://llm.example.com/v1"
    assert endpoint.cost_usd(1_000_000, 2_000_000) == pytest.approx(0.5 + 3.0)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"group": "us"},
            ":16: deployments.chat.managed.0.residency_group: 'us' is outside the deployment's "
            "residency lock 'eu'",
        ),
        ({"env": "sk-live-123"}, ":17: deployments.chat.managed.0.api_key_env: "),
        ({"price": ".inf"}, ":19: deployments.chat.managed.0.usd_per_million_output_tokens: "),
    ],
)
def test_managed_endpoint_mistakes_name_their_line(
    tmp_path: Path, kwargs: dict[str, str], expected: str
) -> None:
    result = check_policy(_with_managed(tmp_path, **kwargs))
    assert any(expected in error for error in result.errors), result.errors


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("gpus: 8", "gpus: true", "deployments.chat.gpus"),
        ("gpus: 8", "gpus: 8.0", "deployments.chat.gpus"),
        ("max_replicas: 4", "max_replicas: 1e32", "deployments.chat.max_replicas"),
        ("max_replicas: 4", "max_replicas: " + "9" * 33, "deployments.chat.max_replicas"),
        ("target: 4", "target: .inf", "deployments.chat.autoscaling.target"),
        ("target: 4", "target: .nan", "deployments.chat.autoscaling.target"),
        ("target: 4", "target: 1e400", "deployments.chat.autoscaling.target"),
        ("target: 4", "target: false", "deployments.chat.autoscaling.target"),
        (
            "max_spilled_replicas: 2}",
            "max_spilled_replicas: 2, max_usd_per_hour: .inf}",
            "deployments.chat.spillover.max_usd_per_hour",
        ),
        ("enabled: true", "enabled: 1", "deployments.chat.spillover.enabled"),
    ],
)
def test_numbers_are_finite_bounded_and_of_their_own_type(
    tmp_path: Path, old: str, new: str, field: str
) -> None:
    """Booleans are not numbers, floats are not counts, and infinity is not a spend cap."""
    assert old in BASE
    result = check_policy(_write(tmp_path, BASE.replace(old, new)))
    assert result.policy is None
    assert any(f": {field}: " in error for error in result.errors), result.errors


def test_an_episode_shorter_than_the_cold_start_is_a_note(tmp_path: Path) -> None:
    data = yaml.safe_load(BASE)
    chat = data["deployments"]["chat"]
    chat["autoscaling"]["costs"] = {"cold_start_s": 450, "expected_episode_s": 300}
    chat["managed"] = [
        {
            "name": "hosted-eu",
            "base_url": "https://llm.eu.example.com/v1",
            "residency_group": "eu",
            "usd_per_million_input_tokens": 1.0,
            "usd_per_million_output_tokens": 1.0,
            "max_concurrency": 8,
        }
    ]
    result = check_policy(_write(tmp_path, yaml.safe_dump(data, sort_keys=False)))
    assert result.errors == [] and result.policy is not None
    (note,) = result.notes
    assert (
        "deployments.chat.autoscaling.costs.expected_episode_s: an episode expected to last "
        in note
    )
    assert "300s is over before a replica's 450s cold start: overflow stays on hosted-eu" in note
    # The defaults (2 s TTFT, a quarter of it) load without a word.
    assert result.policy.deployments["chat"].slo.saturated_after_s == 0.5
