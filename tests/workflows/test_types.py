"""The node activities' inputs as workflows send them agree with what the agent expects."""

from __future__ import annotations

import dataclasses

import pytest

from agent.activities import DrainReplicaInput, StartReplicaInput, StopReplicaInput
from agent.prefetch.activity import PrefetchWeightsInput
from workflows.types import (
    DrainReplicaArgs,
    PrefetchWeightsArgs,
    StartReplicaArgs,
    StopReplicaArgs,
)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (StartReplicaArgs, StartReplicaInput),
        (DrainReplicaArgs, DrainReplicaInput),
        (StopReplicaArgs, StopReplicaInput),
        (PrefetchWeightsArgs, PrefetchWeightsInput),
    ],
)
def test_workflow_side_mirrors_the_agent_side(sent: type, expected: type) -> None:
    ours = {f.name: (f.type, f.default) for f in dataclasses.fields(sent)}
    theirs = {f.name: (f.type, f.default) for f in dataclasses.fields(expected)}
    assert ours == theirs
