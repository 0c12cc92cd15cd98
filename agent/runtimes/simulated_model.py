"""A deterministic model of SGLang's continuous batching, for the simulated runtime.

The model owns no clock and does no I/O: callers pass the time (seconds, any monotonic origin)
to :meth:`BatchingModel.submit` and :meth:`BatchingModel.advance`, and get back what happened
up to that time. Given the same calls it always gives the same answers, so the HTTP server of
the simulated runtime, the benchmark and the trace-driven simulator can all share it.

How it batches, following SGLang's scheduler in spirit (not its code):

- Requests wait in a FIFO queue. An iteration either prefills or decodes, never both.
- Prefill first: requests still in chunked prefill continue, then queued requests are admitted
  in arrival order while the running count stays under ``max_running_requests``, their prompt
  plus ``max_new_tokens`` fits in the KV pool, and the iteration's prefill budget
  (``chunked_prefill_size`` tokens) lasts. A prompt longer than the budget is prefilled over
  several iterations. The iteration takes ``prefill_step_s + tokens / prefill_tokens_per_s``;
  a request's first token appears when its prefill completes.
- Otherwise every running request decodes one token. The iteration takes
  ``decode_step_base_s + decode_step_per_request_s * batch``, so per-request speed falls and
  total throughput rises towards ``1 / decode_step_per_request_s`` as the batch grows.

Time to first token is therefore queueing plus prefill, and it grows sharply once arrivals
exceed what the batch can absorb: the behaviour an autoscaler must see.

Long runs of identical decode iterations (same batch, nobody finishing, nobody admissible) are
applied in one step when no request in the batch streams: the result is the same, to the last
bit of every time, as running them one by one (``fast_forward=False`` does that; a test
compares the two), but a simulated day costs minutes instead of hours.

Prefix cache, as SGLang's radix cache keeps it (:mod:`agent.runtimes.prefix_cache`). A request
may carry its prompt as ``prefix_blocks``: the hashes of its consecutive blocks of
``prefix_block_tokens`` tokens (64 by default; only whole blocks), each hash chained over the
blocks before it. At admission the leading blocks already cached (in order, up to the first
miss) are reused and only the rest of the prompt is prefilled, always at least one token, so a
prompt of whole blocks reuses all but its last. Blocks a request has prefilled are added to the
cache chunk by chunk, so requests still running share them too; when it ends they stay. Cached
blocks live in the KV pool: those no running request uses are evicted, least recently used leaf
first, when an admission needs their room, and never keep a request out. ``token_usage`` counts
the KV of running requests, a shared block once, and not the evictable cache (as SGLang's).
The cache hit rate (``sglang:cache_hit_rate``) is the share of prompt tokens found cached,
over the requests admitted in the last ``CACHE_HIT_WINDOW_S`` seconds (0 when none were);
``cached_tokens_total`` and ``prompt_tokens_total`` (every prompt token, cached or not) give the
cumulative rate. Requests without ``prefix_blocks`` neither hit nor fill the cache, and a model
that never sees any behaves exactly as it did before the cache existed.

Simplifications (assumptions, not measurements): KV for a request is reserved in full at
admission (SGLang reserves less and retracts under pressure); the cache works in blocks (SGLang
in tokens by default) and keeps prompts only (SGLang also keeps generated tokens); every request
generates exactly ``max_new_tokens`` (as with ``ignore_eos``).

This module must stay free of I/O, randomness and wall-clock reads.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

from agent.runtimes.prefix_cache import PrefixCache

# Per-GPU defaults for a Llama-3.1-8B-class dense model in BF16 with tensor parallel size 1.
#
# Calibration anchor (published figure): the AccelMark benchmark submission
# "nvidia_sglang_c43a8309" (FreedomIntelligence/AccelMark, SGLang 0.5.6, CUDA 12.8) reports a
# best output throughput of 3,160 tokens/s for meta-llama/Llama-3.1-8B-Instruct in BF16 on one
# NVIDIA A100-SXM4-40GB. The A100-40GB profile's decode coefficients are chosen so that its
# throughput at a batch of 256 lands there (~3,050 tokens/s) and a single stream decodes at
# ~80 tokens/s. See also the SGLang team's "Achieving Faster Open-Source Llama3 Serving with
# SGLang Runtime" (lmsys.org blog, 2024-07-25) for the A100/H100 Llama-3 figures.
#
# Assumptions (not measured): the other GPUs are scaled from that anchor by HBM bandwidth for
# decode (A100-40GB 1.56 TB/s, A100-80GB 2.04, H100 SXM 3.35, H200 4.8, L40S 0.86) and by
# dense BF16 throughput at 35-45% utilisation for prefill (16 GFLOP per token for 8B
# parameters). KV pool sizes assume --mem-fraction-static 0.88, 16 GB of weights and 128 KiB of
# KV per token (32 layers x 8 KV heads x 128 dims x 2 x BF16). max_running_requests of 256 and
# chunked_prefill_size of 8192 (4096 on 48 GB parts) are assumptions too.


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """How fast one replica serves, and how much it can hold at once."""

    name: str
    max_running_requests: int
    max_total_tokens: int  # KV-cache pool, in tokens
    chunked_prefill_size: int  # prefill tokens per iteration
    prefill_tokens_per_s: float
    prefill_step_s: float  # fixed cost of one prefill iteration
    decode_step_base_s: float  # one decode iteration with an empty batch
    decode_step_per_request_s: float  # added per running request
    context_length: int = 32768

    def __post_init__(self) -> None:
        if self.max_running_requests < 1 or self.max_total_tokens < 2:
            raise ValueError(f"profile {self.name}: capacities must be positive")
        if self.chunked_prefill_size < 1 or self.prefill_tokens_per_s <= 0:
            raise ValueError(f"profile {self.name}: prefill rate and budget must be positive")
        if self.decode_step_base_s <= 0 or self.decode_step_per_request_s < 0:
            raise ValueError(f"profile {self.name}: decode step times must be positive")
        if self.prefill_step_s < 0 or self.context_length < 2:
            raise ValueError(f"profile {self.name}: invalid prefill step or context length")

    def scaled(
        self, tp: int = 1, speedup: float = 1.0, max_running_requests: int | None = None
    ) -> GpuProfile:
        """This profile for a replica over ``tp`` GPUs, running ``speedup`` times faster.

        Assumption (not measured): tensor parallelism scales prefill and decode near-linearly
        and multiplies the KV pool; the fixed cost of a prefill step only shrinks with speedup.
        """
        tp = max(1, tp)
        speed = speedup * tp
        return GpuProfile(
            name=self.name if tp == 1 else f"{tp}x{self.name}",
            max_running_requests=max_running_requests or self.max_running_requests,
            max_total_tokens=self.max_total_tokens * tp,
            chunked_prefill_size=self.chunked_prefill_size,
            prefill_tokens_per_s=self.prefill_tokens_per_s * speed,
            prefill_step_s=self.prefill_step_s / speedup,
            decode_step_base_s=self.decode_step_base_s / speed,
            decode_step_per_request_s=self.decode_step_per_request_s / speed,
            context_length=self.context_length,
        )


PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile("A100-40GB", 256, 150_000, 8192, 9_000.0, 0.004, 0.0125, 0.00028),
        GpuProfile("A100-80GB", 256, 420_000, 8192, 9_000.0, 0.004, 0.0095, 0.000213),
        GpuProfile("H100-80GB", 256, 420_000, 8192, 22_000.0, 0.003, 0.0058, 0.00013),
        GpuProfile("H200", 256, 820_000, 8192, 22_000.0, 0.003, 0.0041, 0.00009),
        GpuProfile("L40S", 256, 200_000, 4096, 5_000.0, 0.005, 0.0225, 0.0005),
    )
}
DEFAULT_PROFILE = "A100-80GB"


def profile_for_gpu(gpu_model: str) -> GpuProfile:
    """The profile for a GPU model name as NVML reports it (``NVIDIA H100 80GB HBM3``)."""
    name = gpu_model.upper()
    if name in (p.upper() for p in PROFILES):
        return next(p for key, p in PROFILES.items() if key.upper() == name)
    if "H200" in name:
        return PROFILES["H200"]
    if "H100" in name or "H800" in name:
        return PROFILES["H100-80GB"]
    if "L40S" in name:
        return PROFILES["L40S"]
    if "A100" in name:
        return PROFILES["A100-40GB" if "40GB" in name else "A100-80GB"]
    return PROFILES[DEFAULT_PROFILE]


class RequestRejected(ValueError):
    """The request can never be served (too long for the context or the KV pool)."""


@dataclass(frozen=True, slots=True)
class Progress:
    """What one request has produced by ``at`` (model time)."""

    request_id: str
    generated: int
    finished: bool
    at: float
    arrived_at: float
    first_token_at: float | None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache, not prefilled


@dataclass(frozen=True, slots=True)
class ModelStats:
    running: int
    queued: int
    used_tokens: int
    max_total_tokens: int
    token_usage: float  # 0..1
    gen_throughput: float  # generated tokens/s over the recent window
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_finished: int
    cached_tokens_total: int = 0  # prompt tokens served from the prefix cache
    cache_hit_rate: float = 0.0  # 0..1, over admissions in the last CACHE_HIT_WINDOW_S
    prefix_cache_tokens: int = 0  # KV tokens the prefix cache holds, in use or evictable


@dataclass(slots=True, eq=False)  # identity: list.remove must not compare fields
class _Request:
    request_id: str
    prompt_tokens: int
    max_new_tokens: int
    arrived_at: float
    stream: bool
    blocks: tuple[int, ...] = ()  # chained hashes of the prompt's whole blocks
    prefilled: int = 0
    generated: int = 0
    first_token_at: float | None = None
    cached: int = 0  # prompt tokens reused from the prefix cache at admission
    held: int = 0  # leading blocks this request holds (locked) in the prefix cache


@dataclass(slots=True)
class _Iteration:
    start: float
    end: float
    prefill: list[tuple[_Request, int]]  # (request, prompt tokens prefilled in this step)
    admitted: list[_Request]
    decode: list[_Request]


THROUGHPUT_WINDOW_S = 2.0
CACHE_HIT_WINDOW_S = 60.0
PREFIX_BLOCK_TOKENS = 64


class BatchingModel:
    """One replica's scheduler: a queue, a running batch, a KV pool and a clock it is given."""

    def __init__(
        self,
        profile: GpuProfile,
        start: float = 0.0,
        *,
        fast_forward: bool = True,
        prefix_block_tokens: int = PREFIX_BLOCK_TOKENS,
    ) -> None:
        self.profile = profile
        self.fast_forward = fast_forward
        #: Tokens per block of ``prefix_blocks``: the granularity of the prefix cache.
        self.prefix_block_tokens = prefix_block_tokens
        self._cache = PrefixCache(prefix_block_tokens)
        self._clock = start
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._ids: set[str] = set()
        self._current: _Iteration | None = None
        # KV reserved for running requests, less the cached blocks they hold (counted there).
        self._reserved = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        # (when, cached prompt tokens, prompt tokens) of each prefill iteration that admitted.
        self._hits: collections.deque[tuple[float, int, int]] = collections.deque()
        self._hit_sums = [0, 0]  # cached and prompt tokens over self._hits
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_finished = 0
        #: Seconds spent in iterations (prefill or decode): the replica's busy time.
        self.busy_s = 0.0

    # -- input ---------------------------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt_tokens: int,
        max_new_tokens: int,
        now: float,
        *,
        stream: bool = False,
        prefix_blocks: Sequence[int] | None = None,
    ) -> None:
        """Queue a request that arrived at ``now``; raise :class:`RequestRejected` if it can
        never be served. With ``stream``, :meth:`advance` reports its every token.

        ``prefix_blocks`` are the hashes of the prompt's consecutive whole blocks of
        :attr:`prefix_block_tokens` tokens, each chained over the blocks before it (equal hash,
        equal prefix); with them the request uses and fills the prefix cache."""
        if request_id in self._ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        blocks = tuple(prefix_blocks) if prefix_blocks else ()
        if len(blocks) * self.prefix_block_tokens > prompt_tokens:
            raise ValueError(
                f"{len(blocks)} prefix blocks of {self.prefix_block_tokens} tokens are more "
                f"than the prompt's {prompt_tokens} tokens"
            )
        if prompt_tokens < 1 or max_new_tokens < 1:
            raise RequestRejected("prompt and max_new_tokens must each be at least 1 token")
        total = prompt_tokens + max_new_tokens
        if total > self.profile.context_length:
            raise RequestRejected(
                f"requested {total} tokens ({prompt_tokens} in the prompt, {max_new_tokens} "
                f"to generate), more than the context length of {self.profile.context_length}"
            )
        if total > self.profile.max_total_tokens:
            raise RequestRejected(
                f"requested {total} tokens, more than the KV pool of "
                f"{self.profile.max_total_tokens}"
            )
        # No advance() here: progress it made would never reach the caller. An iteration that
        # has ended but not been applied yet is applied by the next advance(), before this
        # request (which arrived after it began) can be planned.
        if self._current is None and not self._running and not self._waiting:
            self._clock = max(self._clock, now)
        arrived = max(now, self._clock)
        self._waiting.append(
            _Request(request_id, prompt_tokens, max_new_tokens, arrived, stream, blocks)
        )
        self._ids.add(request_id)

    def cancel(self, request_id: str) -> bool:
        """Forget a request (its client went away); its KV is released at once."""
        if request_id not in self._ids:
            return False
        self._ids.discard(request_id)
        for request in self._waiting:
            if request.request_id == request_id:
                self._waiting.remove(request)
                self._release(request)  # admitted by the iteration under way: it held blocks
                return True
        for request in self._running:
            if request.request_id == request_id:
                self._running.remove(request)
                self._reserved -= self._private(request)
                self._release(request)
                return True
        return True  # admitted in the iteration under way; dropped when it ends

    # -- time ----------------------------------------------------------------------------------

    def advance(self, now: float) -> list[Progress]:
        """Run every iteration that ends by ``now`` and report the progress they made."""
        updates: list[Progress] = []
        while True:
            if self._current is None:
                if not self._running and not self._waiting:
                    self._clock = max(self._clock, now)
                    return updates
                if not self._running and self._waiting[0].arrived_at > self._clock:
                    if self._waiting[0].arrived_at > now:
                        self._clock = now
                        return updates
                    self._clock = self._waiting[0].arrived_at
                self._current = self._plan(self._clock)
            if self._current.end > now:
                return updates
            iteration, self._current = self._current, None
            self._clock = iteration.end
            self._apply(iteration, updates)
            if iteration.decode and self.fast_forward:
                self._skip_decodes(now)

    def next_event_at(self) -> float | None:
        """When the iteration under way ends; None when idle. Call :meth:`advance` then."""
        if self._current is not None:
            return self._current.end
        if self._running or self._waiting:
            return self._clock
        return None

    def stats(self, now: float) -> ModelStats:
        block = self.prefix_block_tokens
        used = sum(r.prompt_tokens + r.generated - r.held * block for r in self._running)
        used += self._cache.locked_tokens
        while self._recent and self._recent[0][0] <= now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        recent = sum(tokens for at, tokens in self._recent if at <= now)
        self._drop_hits(now - CACHE_HIT_WINDOW_S)
        hit, prompt = self._hit_sums
        if self._hits and self._hits[-1][0] > now:  # asked about the past
            hit = sum(cached for at, cached, _ in self._hits if at <= now)
            prompt = sum(tokens for at, _, tokens in self._hits if at <= now)
        return ModelStats(
            running=len(self._running),
            queued=len(self._waiting),
            used_tokens=used,
            max_total_tokens=self.profile.max_total_tokens,
            token_usage=min(1.0, used / self.profile.max_total_tokens),
            gen_throughput=recent / THROUGHPUT_WINDOW_S,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            requests_finished=self.requests_finished,
            cached_tokens_total=self.cached_tokens_total,
            cache_hit_rate=hit / prompt if prompt else 0.0,
            prefix_cache_tokens=self._cache.cached_tokens,
        )

    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._waiting)

    # -- internals -----------------------------------------------------------------------------

    def _plan(self, start: float) -> _Iteration:
        p = self.profile
        budget = p.chunked_prefill_size
        chunks: list[tuple[_Request, int]] = []
        for request in self._running:
            if budget <= 0:
                break
            remaining = request.prompt_tokens - request.prefilled
            if remaining > 0:
                take = min(budget, remaining)
                chunks.append((request, take))
                budget -= take
        admitted: list[_Request] = []
        reserved = self._reserved
        for request in self._waiting:
            if budget <= 0 or len(self._running) + len(admitted) >= p.max_running_requests:
                break
            if request.arrived_at > start:
                break
            hits, unlocked, need = self._cache_need(request)
            if reserved + self._cache.locked_tokens + unlocked + need > p.max_total_tokens:
                break  # first come, first served: nobody overtakes the head of the queue
            if hits:
                self._cache.lock(request.blocks, hits)
                request.held = hits
                request.cached = hits * self.prefix_block_tokens
            excess = reserved + need + self._cache.cached_tokens - p.max_total_tokens
            if excess > 0:  # make room: unused cached blocks never keep a request out
                self._cache.evict(excess)
            take = min(budget, request.prompt_tokens - request.cached)
            admitted.append(request)
            chunks.append((request, take))
            reserved += need
            budget -= take
        if chunks:
            tokens = sum(take for _, take in chunks)
            duration = p.prefill_step_s + tokens / p.prefill_tokens_per_s
            return _Iteration(start, start + duration, chunks, admitted, [])
        batch = [r for r in self._running if r.prefilled == r.prompt_tokens]
        duration = p.decode_step_base_s + p.decode_step_per_request_s * len(batch)
        return _Iteration(start, start + duration, [], [], batch)

    def _skip_decodes(self, now: float) -> None:
        """Apply, at once, the decode iterations after this one that change nothing but counts.

        They must end by ``now``, finish nobody and admit nobody, and no request in the batch
        may stream (each of its tokens is reported). Times are summed one iteration at a time,
        exactly as :meth:`advance` would, so the results are bit for bit the same.
        """
        p = self.profile
        batch = self._running
        if not batch:
            return
        step = p.decode_step_base_s + p.decode_step_per_request_s * len(batch)
        if self._clock + step > now:  # not even one more ends by now: skip the batch scans
            return
        if any(r.stream or r.prefilled < r.prompt_tokens for r in batch):
            return
        left = min(r.max_new_tokens - r.generated for r in batch)
        if left <= 1:
            return
        head_arrival: float | None = None
        if self._waiting and len(batch) < p.max_running_requests:
            head = self._waiting[0]
            _, unlocked, need = self._cache_need(head)
            if self._reserved + self._cache.locked_tokens + unlocked + need <= p.max_total_tokens:
                head_arrival = head.arrived_at  # admitted at the first iteration after it
        t = self._clock
        n = 0
        ends: list[float] = []
        busy = self.busy_s
        while n < left - 1:
            if head_arrival is not None and head_arrival <= t:
                break
            end = t + step
            if end > now:
                break
            busy += end - t
            t = end
            ends.append(end)
            n += 1
        if n == 0:
            return
        for request in batch:
            request.generated += n
        produced = n * len(batch)
        self.generation_tokens_total += produced
        self.busy_s = busy
        self._recent.extend((end, len(batch)) for end in ends)
        self._clock = t
        self._trim_recent()

    def _drop_hits(self, horizon: float) -> None:
        while self._hits and self._hits[0][0] <= horizon:
            _, hit, prompt = self._hits.popleft()
            self._hit_sums[0] -= hit
            self._hit_sums[1] -= prompt

    def _trim_recent(self) -> None:
        horizon = self._clock - THROUGHPUT_WINDOW_S
        while self._recent and self._recent[0][0] <= horizon:
            self._recent.popleft()

    def _apply(self, iteration: _Iteration, updates: list[Progress]) -> None:
        end = iteration.end
        self.busy_s += end - iteration.start
        if iteration.admitted:
            hit = prompt = 0
            for request in iteration.admitted:
                if request.request_id in self._ids:  # else cancelled while being admitted
                    self._waiting.remove(request)
                    self._running.append(request)
                    self._reserved += self._private(request)
                    request.prefilled = request.cached
                    hit += request.cached
                    prompt += request.prompt_tokens
            self.prompt_tokens_total += hit
            self.cached_tokens_total += hit
            self._hits.append((end, hit, prompt))
            self._hit_sums[0] += hit
            self._hit_sums[1] += prompt
            self._drop_hits(end - CACHE_HIT_WINDOW_S)
        produced = 0
        for request, take in iteration.prefill:
            if request.request_id not in self._ids:
                continue
            request.prefilled += take
            self.prompt_tokens_total += take
            if request.blocks:
                self._cache_prefilled(request)
            if request.prefilled == request.prompt_tokens:
                request.generated = 1
                request.first_token_at = end
                produced += 1
                self._progress(request, end, updates, always=True)
        for request in iteration.decode:
            if request.request_id not in self._ids or request.generated >= request.max_new_tokens:
                continue
            request.generated += 1
            produced += 1
            self._progress(request, end, updates, always=False)
        if produced:
            self.generation_tokens_total += produced
            self._recent.append((end, produced))
            self._trim_recent()

    def _progress(
        self, request: _Request, at: float, updates: list[Progress], always: bool
    ) -> None:
        finished = request.generated >= request.max_new_tokens
        if finished:
            self._running.remove(request)
            self._ids.discard(request.request_id)
            self._reserved -= self._private(request)
            self._release(request)
            self.requests_finished += 1
        if finished or always or request.stream:
            updates.append(
                Progress(
                    request.request_id,
                    request.generated,
                    finished,
                    at,
                    request.arrived_at,
                    request.first_token_at,
                    request.cached,
                )
            )

    # -- prefix cache --------------------------------------------------------------------------

    def _cache_need(self, request: _Request) -> tuple[int, int, int]:
        """For admitting ``request`` now: the leading blocks it would reuse, the tokens of
        those no running request uses yet, and the KV it needs besides them."""
        total = request.prompt_tokens + request.max_new_tokens
        if not request.blocks:
            return 0, 0, total
        block = self.prefix_block_tokens
        # The last prompt token is always prefilled (its logits give the first new token).
        hits, unlocked = self._cache.match(request.blocks, (request.prompt_tokens - 1) // block)
        return hits, unlocked, total - hits * block

    def _private(self, request: _Request) -> int:
        """KV reserved for ``request`` outside the cached blocks it holds."""
        return (
            request.prompt_tokens + request.max_new_tokens - request.held * self.prefix_block_tokens
        )

    def _cache_prefilled(self, request: _Request) -> None:
        """Cache (and hold) the whole blocks of ``request``'s prompt prefilled so far."""
        whole = min(len(request.blocks), request.prefilled // self.prefix_block_tokens)
        if whole > request.held:
            held = self._cache.insert(request.blocks, request.held, whole)
            self._reserved -= (held - request.held) * self.prefix_block_tokens
            request.held = held

    def _release(self, request: _Request) -> None:
        if request.held:
            self._cache.release(request.blocks, request.held)
            request.held = 0
