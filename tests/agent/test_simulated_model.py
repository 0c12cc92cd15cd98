"""The continuous-batching model behind the simulated runtime, driven with explicit times."""

from __future__ import annotations

import dataclasses

import pytest

from agent.runtimes.simulated_model import (
    PROFILES,
    BatchingModel,
    GpuProfile,
    Progress,
    RequestRejected,
    profile_for_gpu,
)

SMALL = GpuProfile(
    name="test",
    max_running_requests=4,
    max_total_tokens=10_000,
    chunked_prefill_size=512,
    prefill_tokens_per_s=10_000.0,
    prefill_step_s=0.002,
    decode_step_base_s=0.01,
    decode_step_per_request_s=0.001,
    context_length=4096,
)


def run(model: BatchingModel, until: float, step: float = 0.001) -> list[Progress]:
    updates: list[Progress] = []
    t = 0.0
    while t <= until:
        updates += model.advance(t)
        t += step
    return updates


def finished(updates: list[Progress]) -> dict[str, Progress]:
    return {u.request_id: u for u in updates if u.finished}


def test_one_request_takes_prefill_then_one_decode_step_per_token() -> None:
    model = BatchingModel(SMALL)
    model.submit("a", 300, 5, 0.0)
    done = finished(model.advance(10.0))["a"]
    prefill = SMALL.prefill_step_s + 300 / SMALL.prefill_tokens_per_s
    step = SMALL.decode_step_base_s + SMALL.decode_step_per_request_s
    assert done.first_token_at == pytest.approx(prefill)
    assert done.at == pytest.approx(prefill + 4 * step)  # the first token came from prefill
    assert done.generated == 5
    stats = model.stats(10.0)
    assert (stats.running, stats.queued, stats.requests_finished) == (0, 0, 1)
    assert stats.prompt_tokens_total == 300 and stats.generation_tokens_total == 5


def test_a_long_prompt_is_prefilled_in_chunks() -> None:
    model = BatchingModel(SMALL)
    model.submit("long", 1200, 1, 0.0)  # 512 + 512 + 176 tokens: three prefill iterations
    done = finished(model.advance(10.0))["long"]
    expected = 3 * SMALL.prefill_step_s + 1200 / SMALL.prefill_tokens_per_s
    assert done.first_token_at == pytest.approx(expected)


def test_time_to_first_token_grows_with_the_queue() -> None:
    model = BatchingModel(SMALL)
    for i in range(12):
        model.submit(f"r{i}", 100, 50, 0.0)
    stats = model.stats(0.0)
    assert stats.queued == 12
    model.advance(0.05)
    stats = model.stats(0.05)
    assert stats.running == SMALL.max_running_requests
    assert stats.queued == 12 - SMALL.max_running_requests
    done = finished(model.advance(100.0))
    ttft = [done[f"r{i}"].first_token_at for i in range(12)]
    assert all(t is not None for t in ttft)
    first_wave, second_wave, third_wave = ttft[0], ttft[4], ttft[8]
    assert first_wave is not None and second_wave is not None and third_wave is not None
    # Later waves wait for a whole batch of 50 tokens to finish first.
    assert second_wave > first_wave + 49 * SMALL.decode_step_base_s
    assert third_wave > second_wave + 49 * SMALL.decode_step_base_s


def test_throughput_rises_with_batch_size_towards_the_decode_limit() -> None:
    profile = dataclasses.replace(SMALL, max_running_requests=64, max_total_tokens=100_000)
    rates = []
    for concurrency in (1, 8, 64):
        model = BatchingModel(profile)
        for i in range(concurrency):
            model.submit(f"r{i}", 10, 200, 0.0)
        done = finished(model.advance(1000.0))
        end = max(p.at for p in done.values())
        rates.append(concurrency * 200 / end)
    assert rates[0] < rates[1] < rates[2]
    assert rates[2] < 1 / profile.decode_step_per_request_s


def test_the_kv_pool_limits_admission() -> None:
    profile = dataclasses.replace(SMALL, max_total_tokens=1000)
    model = BatchingModel(profile)
    model.submit("a", 300, 300, 0.0)
    model.submit("b", 300, 300, 0.0)  # 1200 tokens reserved: b waits for a
    model.advance(0.1)
    assert (model.stats(0.1).running, model.stats(0.1).queued) == (1, 1)
    done = finished(model.advance(100.0))
    b_first = done["b"].first_token_at
    assert b_first is not None and b_first >= done["a"].at


def test_same_calls_give_the_same_answers() -> None:
    def scenario() -> list[Progress]:
        model = BatchingModel(SMALL)
        out: list[Progress] = []
        for i in range(20):
            out += model.advance(i * 0.013)
            model.submit(f"r{i}", 50 + 37 * i, 5 + i, i * 0.013, stream=i % 3 == 0)
        return out + model.advance(100.0)

    first, second = scenario(), scenario()
    assert first == second
    assert len(finished(first)) == 20


def test_streaming_requests_report_every_token() -> None:
    model = BatchingModel(SMALL)
    model.submit("s", 10, 6, 0.0, stream=True)
    model.submit("q", 10, 6, 0.0)
    updates = model.advance(10.0)
    assert [u.generated for u in updates if u.request_id == "s"] == [1, 2, 3, 4, 5, 6]
    assert [u.generated for u in updates if u.request_id == "q"] == [1, 6]


def test_cancel_frees_the_slot() -> None:
    model = BatchingModel(dataclasses.replace(SMALL, max_running_requests=1))
    model.submit("a", 10, 1000, 0.0)
    model.submit("b", 10, 3, 0.0)
    model.advance(0.1)
    assert model.stats(0.1).queued == 1
    assert model.cancel("a")
    done = finished(model.advance(5.0))
    assert "b" in done and "a" not in done
    assert not model.cancel("a")


def test_requests_that_can_never_fit_are_rejected() -> None:
    model = BatchingModel(SMALL)
    with pytest.raises(RequestRejected, match="context length of 4096"):
        model.submit("big", 4000, 200, 0.0)
    with pytest.raises(RequestRejected, match="at least 1"):
        model.submit("empty", 10, 0, 0.0)
    model.submit("ok", 10, 1, 0.0)
    with pytest.raises(ValueError, match="already in use"):
        model.submit("ok", 10, 1, 0.0)


def test_throughput_window_decays_when_idle() -> None:
    model = BatchingModel(SMALL)
    model.submit("a", 10, 100, 0.0)
    model.advance(0.5)
    assert model.stats(0.5).gen_throughput > 0
    model.advance(100.0)
    assert model.stats(100.0).gen_throughput == 0


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA H200", "H200"),
        ("something else", "A100-80GB"),
    ],
)
def test_gpu_names_map_to_profiles(name: str, profile: str) -> None:
    assert profile_for_gpu(name).name == profile


def test_faster_gpus_serve_more() -> None:
    def peak(profile: GpuProfile) -> float:
        batch = profile.max_running_requests
        return batch / (profile.decode_step_base_s + profile.decode_step_per_request_s * batch)

    assert peak(PROFILES["L40S"]) < peak(PROFILES["A100-40GB"]) < peak(PROFILES["H100-80GB"])
    assert peak(PROFILES["H100-80GB"]) < peak(PROFILES["H200"])


def test_progress_made_before_a_late_submit_is_still_reported() -> None:
    model = BatchingModel(SMALL)
    model.submit("a", 10, 2, 0.0)
    # Nobody called advance() while "a" ran; "b" arrives long after "a" has finished.
    model.submit("b", 10, 2, 5.0)
    done = finished(model.advance(10.0))
    assert set(done) == {"a", "b"}
    b_first = done["b"].first_token_at
    assert done["a"].at < 1.0 and b_first is not None and b_first > 5.0


@pytest.mark.parametrize("seed", range(6))
def test_fast_forward_gives_bit_identical_results(seed: int) -> None:
    """Skipping runs of identical decode steps changes no time, token count or busy time."""
    import random

    rng = random.Random(seed)
    profile = dataclasses.replace(SMALL, max_running_requests=rng.choice([2, 4, 16]))
    fast = BatchingModel(profile, fast_forward=True)
    slow = BatchingModel(profile, fast_forward=False)
    now = 0.0
    got: dict[bool, list[Progress]] = {True: [], False: []}
    for index in range(300):
        now += rng.expovariate(rng.choice([5.0, 40.0, 200.0]))
        prompt = rng.randint(1, 1500)
        new = rng.randint(1, 300)
        stream = rng.random() < 0.1
        for model, out in ((fast, got[True]), (slow, got[False])):
            out += model.advance(now)
            model.submit(f"r{index}", prompt, new, now, stream=stream)
        if rng.random() < 0.2:  # poll in between, as a server or router would
            probe = now + rng.random() * 0.05
            got[True] += fast.advance(probe)
            got[False] += slow.advance(probe)
            assert fast.stats(probe) == slow.stats(probe)
    got[True] += fast.advance(now + 1e4)
    got[False] += slow.advance(now + 1e4)
    assert got[True] == got[False]
    assert sum(1 for p in got[True] if p.finished) == 300
    assert fast.busy_s == slow.busy_s > 0
    assert fast.stats(now + 1e4) == slow.stats(now + 1e4)


@pytest.mark.parametrize("seed", range(6))
def test_fast_forward_gives_bit_identical_results_with_a_prefix_cache(seed: int) -> None:
    """The same, with prompts that share prefixes (so hits, sharing and eviction happen) and
    with cancellations."""
    import hashlib
    import random

    rng = random.Random(seed)
    profile = dataclasses.replace(
        SMALL, max_running_requests=rng.choice([2, 4, 16]), max_total_tokens=6000
    )
    fast = BatchingModel(profile, fast_forward=True)
    slow = BatchingModel(profile, fast_forward=False)
    block = fast.prefix_block_tokens
    families = [
        [
            int.from_bytes(hashlib.blake2b(f"{f}/{i}".encode()).digest()[:8], "big")
            for i in range(24)
        ]
        for f in range(5)
    ]
    now = 0.0
    got: dict[bool, list[Progress]] = {True: [], False: []}
    for index in range(300):
        now += rng.expovariate(rng.choice([5.0, 40.0, 200.0]))
        prompt = rng.randint(1, 1500)
        new = rng.randint(1, 300)
        stream = rng.random() < 0.1
        prefix = rng.choice(families)[: rng.randint(0, prompt // block)]
        victim = f"r{rng.randint(0, index)}" if rng.random() < 0.05 else None
        for model, out in ((fast, got[True]), (slow, got[False])):
            out += model.advance(now)
            model.submit(f"r{index}", prompt, new, now, stream=stream, prefix_blocks=prefix)
            if victim is not None:
                model.cancel(victim)
        if rng.random() < 0.2:
            probe = now + rng.random() * 0.05
            got[True] += fast.advance(probe)
            got[False] += slow.advance(probe)
            assert fast.stats(probe) == slow.stats(probe)
    got[True] += fast.advance(now + 1e4)
    got[False] += slow.advance(now + 1e4)
    assert got[True] == got[False]
    assert any(p.cached_tokens for p in got[True])
    assert fast.busy_s == slow.busy_s > 0
    assert fast.stats(now + 1e4) == slow.stats(now + 1e4)
    assert fast.stats(now + 1e4).cached_tokens_total > 0


def test_scaled_profile_multiplies_rates_and_kv_by_tensor_parallel_size() -> None:
    base = PROFILES["H100-80GB"]
    eight = base.scaled(tp=8)
    assert eight.name == "8xH100-80GB"
    assert eight.max_total_tokens == base.max_total_tokens * 8
    assert eight.prefill_tokens_per_s == pytest.approx(base.prefill_tokens_per_s * 8)
    assert eight.decode_step_per_request_s == pytest.approx(base.decode_step_per_request_s / 8)
    assert base.scaled() == base
