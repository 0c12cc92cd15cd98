"""The prefix cache of the simulated runtime, alone and inside the batching model."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest

from agent.runtimes.prefix_cache import PrefixCache
from agent.runtimes.simulated_model import (
    CACHE_HIT_WINDOW_S,
    BatchingModel,
    GpuProfile,
    Progress,
)

BLOCK = 64
PROFILE = GpuProfile(
    name="test",
    max_running_requests=8,
    max_total_tokens=10_000,
    chunked_prefill_size=512,
    prefill_tokens_per_s=10_000.0,
    prefill_step_s=0.002,
    decode_step_base_s=0.01,
    decode_step_per_request_s=0.001,
    context_length=4096,
)


def chain(*labels: str) -> list[int]:
    """Chained block hashes: block ``i`` stands for the prompt up to ``labels[i]``."""
    hashes: list[int] = []
    previous = b""
    for label in labels:
        previous = hashlib.blake2b(previous + label.encode(), digest_size=8).digest()
        hashes.append(int.from_bytes(previous, "big"))
    return hashes


def blocks(prefix: str, count: int, *tail: str) -> list[int]:
    return chain(*(f"{prefix}{i}" for i in range(count)), *tail)


def done(updates: list[Progress]) -> dict[str, Progress]:
    return {u.request_id: u for u in updates if u.finished}


def prefill_s(profile: GpuProfile, tokens: int) -> float:
    """One prefill iteration of ``tokens`` (within the chunk budget)."""
    return profile.prefill_step_s + tokens / profile.prefill_tokens_per_s


def physical_kv(model: BatchingModel) -> int:
    """KV the pool holds: running requests' reservations plus every cached block."""
    return model._reserved + model._cache.cached_tokens


# -- the cache alone ---------------------------------------------------------------------------


def test_match_follows_the_chain_and_stops_at_the_first_miss() -> None:
    cache = PrefixCache(BLOCK)
    a = blocks("a", 5)
    assert cache.insert(a, 0, 5) == 5
    assert cache.match(a, 5) == (5, 0)  # all cached, all in use
    assert cache.match(a, 3) == (3, 0)
    other = [*a[:2], *blocks("b", 3)]
    assert cache.match(other, 5)[0] == 2
    assert cache.match(a[1:], 4)[0] == 0  # a block is cached only after its own parent
    cache.release(a, 5)
    assert cache.match(a, 5) == (5, 5 * BLOCK)
    assert (cache.cached_tokens, cache.locked_tokens, cache.evictable_tokens) == (320, 0, 320)


def test_eviction_takes_least_recently_used_leaves_first() -> None:
    cache = PrefixCache(BLOCK)
    a, b = blocks("a", 4), blocks("b", 4)
    for hashes in (a, b):
        cache.insert(hashes, 0, 4)
        cache.release(hashes, 4)
    cache.lock(a, 4)  # a used again: b is now the least recently used
    cache.release(a, 4)
    assert cache.evict(1) == BLOCK
    assert cache.match(b, 4)[0] == 3  # b lost its last block, not its first
    assert cache.evict(3 * BLOCK) == 3 * BLOCK
    assert cache.match(b, 4)[0] == 0 and cache.match(a, 4)[0] == 4
    cache.lock(a, 2)  # a's first two blocks are in use: only its tail can go
    assert cache.evict(10**6) == 2 * BLOCK
    assert cache.match(a, 4) == (2, 0)


def test_a_hash_under_another_parent_is_a_miss_and_is_not_inserted() -> None:
    cache = PrefixCache(BLOCK)
    cache.insert([1, 2], 0, 2)
    assert cache.match([3, 2], 2)[0] == 0
    assert cache.insert([3, 2], 0, 2) == 1  # 3 is new; 2 belongs to another prefix
    assert cache.cached_tokens == 3 * BLOCK


# -- inside the batching model -----------------------------------------------------------------


def test_a_repeated_prefix_is_prefilled_once() -> None:
    model = BatchingModel(PROFILE)
    system = blocks("system", 6)  # 384 tokens shared
    model.submit("first", 400, 3, 0.0, prefix_blocks=system)
    first = done(model.advance(10.0))["first"]
    assert first.cached_tokens == 0
    assert first.first_token_at == pytest.approx(prefill_s(PROFILE, 400))

    model.submit("second", 450, 3, 20.0, prefix_blocks=[*system, *chain("other")])
    second = done(model.advance(30.0))["second"]
    assert second.cached_tokens == 6 * BLOCK
    assert second.first_token_at is not None
    ttft = second.first_token_at - second.arrived_at
    assert ttft == pytest.approx(prefill_s(PROFILE, 450 - 384))  # only the uncached tokens

    stats = model.stats(30.0)
    assert stats.cached_tokens_total == 384
    assert stats.prompt_tokens_total == 850  # every prompt token, cached or not
    assert stats.cache_hit_rate == pytest.approx(384 / 850)
    assert stats.prefix_cache_tokens == 7 * BLOCK  # six shared blocks and second's own
    assert stats.used_tokens == 0  # nobody runs: the cache is all evictable


def test_at_least_one_token_is_prefilled() -> None:
    model = BatchingModel(PROFILE)
    whole = blocks("p", 5)  # a prompt of exactly five blocks
    model.submit("a", 320, 1, 0.0, prefix_blocks=whole)
    model.submit("b", 320, 1, 1.0, prefix_blocks=whole)  # reuses four, prefills the last
    model.submit("c", 321, 1, 2.0, prefix_blocks=whole)  # reuses five, prefills one token
    got = done(model.advance(10.0))
    assert [got[r].cached_tokens for r in "abc"] == [0, 256, 320]
    c_first = got["c"].first_token_at
    assert c_first is not None and c_first - 2.0 == pytest.approx(prefill_s(PROFILE, 1))


def test_running_requests_share_their_prefilled_blocks() -> None:
    model = BatchingModel(PROFILE)
    system = blocks("system", 10)
    model.submit("long", 700, 500, 0.0, prefix_blocks=system)
    model.advance(0.5)  # "long" has prefilled and decodes
    used_alone = model.stats(0.5).used_tokens
    model.submit("join", 710, 500, 0.5, prefix_blocks=[*system, *chain("x")])
    model.advance(0.6)
    stats = model.stats(0.6)
    assert stats.running == 2
    assert model.cancel("join") and model.cancel("long")
    # The shared 640 tokens are held once: the second request adds only its own KV.
    assert stats.used_tokens - used_alone < 700
    assert model.stats(0.6).used_tokens == 0


def test_a_chunked_prompt_is_cached_chunk_by_chunk() -> None:
    model = BatchingModel(PROFILE)  # 512-token prefill chunks
    model.submit("long", 1500, 1, 0.0, prefix_blocks=blocks("doc", 23))
    model.advance(prefill_s(PROFILE, 512) + 1e-9)  # one chunk prefilled
    assert model.stats(0.06).prefix_cache_tokens == 512
    model.advance(10.0)
    assert model.stats(10.0).prefix_cache_tokens == 23 * BLOCK


def test_unused_blocks_are_evicted_least_recently_used_first() -> None:
    profile = dataclasses.replace(PROFILE, max_total_tokens=2000)
    model = BatchingModel(profile)
    a, b, c = blocks("a", 10), blocks("b", 10), blocks("c", 10)
    model.submit("a", 700, 10, 0.0, prefix_blocks=a)
    model.submit("b", 700, 10, 1.0, prefix_blocks=b)
    model.submit("a-again", 700, 10, 2.0, prefix_blocks=a)  # a is now more recent than b
    model.advance(3.0)
    assert model.stats(3.0).prefix_cache_tokens == 1280
    # 870 tokens needed, 720 free: three of b's blocks (its last three) make room.
    model.submit("c", 700, 170, 3.0, prefix_blocks=c)
    got = done(model.advance(8.0))
    assert got["c"].cached_tokens == 0
    assert physical_kv(model) <= profile.max_total_tokens
    model.submit("b-again", 700, 10, 8.0, prefix_blocks=b)
    model.submit("a-third", 700, 10, 9.0, prefix_blocks=a)
    got = done(model.advance(12.0))
    assert got["b-again"].cached_tokens == 7 * BLOCK
    assert got["a-third"].cached_tokens == 10 * BLOCK


def test_admission_is_never_blocked_by_the_cache() -> None:
    profile = dataclasses.replace(PROFILE, max_total_tokens=3000, max_running_requests=64)
    model = BatchingModel(profile)
    for i in range(40):  # fill the pool with cached prompts nobody uses any more
        model.submit(f"fill{i}", 200, 1, i * 0.1, prefix_blocks=blocks(f"f{i}-", 3))
    model.advance(10.0)
    assert model.stats(10.0).prefix_cache_tokens > 2500
    # A request that needs nearly the whole pool starts at once, as on an empty replica.
    model.submit("big", 2000, 900, 20.0)
    big = done(model.advance(100.0))["big"]
    fresh = BatchingModel(profile, 20.0)
    fresh.submit("big", 2000, 900, 20.0)
    assert big == done(fresh.advance(100.0))["big"]
    assert physical_kv(model) <= profile.max_total_tokens


def test_the_hit_rate_covers_recent_admissions() -> None:
    model = BatchingModel(PROFILE)
    shared = blocks("s", 8)
    for i in range(4):
        model.submit(f"r{i}", 600, 2, i * 1.0, prefix_blocks=[*shared, *chain(f"q{i}")])
    model.advance(10.0)
    stats = model.stats(10.0)
    assert stats.cache_hit_rate == pytest.approx(3 * 512 / (4 * 600))
    assert stats.cached_tokens_total == 3 * 512
    later = model.stats(10.0 + CACHE_HIT_WINDOW_S)
    assert later.cache_hit_rate == 0.0 and later.cached_tokens_total == 3 * 512


def test_cancelled_requests_leave_their_blocks_cached_and_unused() -> None:
    model = BatchingModel(PROFILE)
    doc = blocks("doc", 20)
    model.submit("gone", 1400, 100, 0.0, prefix_blocks=doc)
    model.advance(0.06)  # in the middle of its prefill
    assert model.cancel("gone")
    stats = model.stats(0.06)
    assert stats.used_tokens == 0 and stats.prefix_cache_tokens == 512
    model.advance(1.0)
    model.submit("next", 1400, 1, 1.0, prefix_blocks=doc)
    assert done(model.advance(5.0))["next"].cached_tokens == 512


def test_prefix_blocks_must_fit_in_the_prompt() -> None:
    model = BatchingModel(PROFILE)
    with pytest.raises(ValueError, match="more than the prompt"):
        model.submit("x", 100, 1, 0.0, prefix_blocks=blocks("p", 2))
    model.submit("y", 128, 1, 0.0, prefix_blocks=blocks("p", 2))


def test_the_block_size_is_a_model_parameter() -> None:
    model = BatchingModel(PROFILE, prefix_block_tokens=16)
    model.submit("a", 100, 1, 0.0, prefix_blocks=blocks("p", 6))
    model.submit("b", 100, 1, 1.0, prefix_blocks=blocks("p", 6))
    assert done(model.advance(5.0))["b"].cached_tokens == 96


@pytest.mark.parametrize("seed", range(4))
def test_the_pool_never_overflows_under_random_load(seed: int) -> None:
    rng = random.Random(seed)
    profile = dataclasses.replace(PROFILE, max_total_tokens=4000, max_running_requests=6)
    model = BatchingModel(profile)
    now = 0.0
    for index in range(300):
        now += rng.expovariate(50.0)
        model.advance(now)
        prompt = rng.randint(1, 1500)
        count = rng.randint(0, prompt // BLOCK)
        prefix = blocks(f"t{rng.randint(0, 5)}-", count)
        model.submit(f"r{index}", prompt, rng.randint(1, 200), now, prefix_blocks=prefix)
        if rng.random() < 0.1:
            model.cancel(f"r{rng.randint(0, index)}")
        assert physical_kv(model) <= profile.max_total_tokens
        assert 0 <= model.stats(now).used_tokens <= profile.max_total_tokens
    model.advance(now + 1e4)
    stats = model.stats(now + 1e4)
    assert stats.running == stats.queued == stats.used_tokens == 0
    assert model._cache.locked_tokens == 0 and model._reserved == 0
