"""``prefetch_weights`` as a real Temporal activity: a worker of our own against the session's
Temporal dev server, a workflow that calls it with a retry policy, and an origin that breaks the
first attempt, so the second must resume from the heartbeat details."""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from agent.prefetch.activity import PrefetchWeightsInput, PrefetchWeightsOutput, prefetch_weights
from tests.agent.prefetch.faults import Fault, FaultyOrigin

MiB = 1024 * 1024


@workflow.defn(sandboxed=False)
class PrefetchOnce:
    @workflow.run
    async def run(self, params: PrefetchWeightsInput) -> PrefetchWeightsOutput:
        return await workflow.execute_activity(
            prefetch_weights,
            params,
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=timedelta(seconds=20),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=100), maximum_attempts=3
            ),
        )


async def _run(address: str, params: PrefetchWeightsInput) -> PrefetchWeightsOutput:
    client = await Client.connect(address)
    queue = f"prefetch-test-{uuid.uuid4().hex[:8]}"
    async with Worker(
        client,
        task_queue=queue,
        workflows=[PrefetchOnce],
        activities=[prefetch_weights],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        return await client.execute_workflow(
            PrefetchOnce.run,
            params,
            id=f"prefetch-{uuid.uuid4().hex}",
            task_queue=queue,
            execution_timeout=timedelta(seconds=90),
        )


def _params(origin: FaultyOrigin, dest: Path, name: str) -> PrefetchWeightsInput:
    return PrefetchWeightsInput(
        source=origin.base,
        destination=str(dest),
        files=[name],
        connections=4,
        range_size=256 * 1024,
        retries=0,
        fsync=False,
    )


async def test_retried_attempt_resumes_from_heartbeat(
    temporal_address: str, origin: FaultyOrigin, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB)
    # Ten ranges go through, then one connection resets; with no range retries the first
    # attempt fails and Temporal runs a second one.
    origin.add("w.bin", data, Fault("reset", times=1, after=1000, skip=10))
    out = await _run(temporal_address, _params(origin, tmp_path, "w.bin"))
    assert (tmp_path / "w.bin").read_bytes() == data
    assert out.attempt == 2
    assert out.resumed_from_heartbeat
    assert out.resumed_bytes >= 10 * 256 * 1024 - 3 * 256 * 1024
    assert out.fetched_bytes == len(data) - out.resumed_bytes
    fetched_twice = origin.served["w.bin"] - len(data)
    assert 0 <= fetched_twice < len(data) - out.fetched_bytes
    assert await asyncio.to_thread(Path(out.manifest).exists)


async def test_missing_object_fails_without_retry(
    temporal_address: str, origin: FaultyOrigin, tmp_path: Path
) -> None:
    origin.add("other.bin", b"x")
    with pytest.raises(WorkflowFailureError) as failure:
        await _run(temporal_address, _params(origin, tmp_path, "gone.bin"))
    cause = failure.value.cause
    assert isinstance(cause, ActivityError)
    app = cause.cause
    assert isinstance(app, ApplicationError)
    assert app.type == "NotFoundError"
    assert app.non_retryable
    assert "gone.bin" in app.message
    assert cause.retry_state is not None
