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

Simplifications (assumptions, not measurements): KV for a request is reserved in full at
admission (SGLang reserves less and retracts under pressure); no prefix cache, so the cache hit
rate is always 0; every request generates exactly ``max_new_tokens`` (as with ``ignore_eos``).

This module must stay free of I/O, randomness and wall-clock reads.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

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


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt_tokens: int
    max_new_tokens: int
    arrived_at: float
    stream: bool
    prefilled: int = 0
    generated: int = 0
    first_token_at: float | None = None


@dataclass(slots=True)
class _Iteration:
    start: float
    end: float
    prefill: list[tuple[_Request, int]]  # (request, prompt tokens prefilled in this step)
    admitted: list[_Request]
    decode: list[_Request]


THROUGHPUT_WINDOW_S = 2.0


class BatchingModel:
    """One replica's scheduler: a queue, a running batch, a KV pool and a clock it is given."""

    def __init__(
        self, profile: GpuProfile, start: float = 0.0, *, fast_forward: bool = True
    ) -> None:
        self.profile = profile
        self.fast_forward = fast_forward
        self._clock = start
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._ids: set[str] = set()
        self._current: _Iteration | None = None
        self._reserved = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.prompt_tokens_total = 0
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
    ) -> None:
        """Queue a request that arrived at ``now``; raise :class:`RequestRejected` if it can
        never be served. With ``stream``, :meth:`advance` reports its every token."""
        if request_id in self._ids:
            raise ValueError(f"request id {request_id!r} is already in use")
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
        self._waiting.append(
            _Request(request_id, prompt_tokens, max_new_tokens, max(now, self._clock), stream)
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
                return True
        for request in self._running:
            if request.request_id == request_id:
                self._running.remove(request)
                self._reserved -= request.prompt_tokens + request.max_new_tokens
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
        used = sum(r.prompt_tokens + r.generated for r in self._running)
        while self._recent and self._recent[0][0] <= now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        recent = sum(tokens for at, tokens in self._recent if at <= now)
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
            need = request.prompt_tokens + request.max_new_tokens
            if reserved + need > p.max_total_tokens:
                break  # first come, first served: nobody overtakes the head of the queue
            take = min(budget, request.prompt_tokens)
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
            if self._reserved + head.prompt_tokens + head.max_new_tokens <= p.max_total_tokens:
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

    def _trim_recent(self) -> None:
        horizon = self._clock - THROUGHPUT_WINDOW_S
        while self._recent and self._recent[0][0] <= horizon:
            self._recent.popleft()

    def _apply(self, iteration: _Iteration, updates: list[Progress]) -> None:
        end = iteration.end
        self.busy_s += end - iteration.start
        for request in iteration.admitted:
            if request.request_id in self._ids:  # else cancelled while being admitted
                self._waiting.remove(request)
                self._running.append(request)
                self._reserved += request.prompt_tokens + request.max_new_tokens
        produced = 0
        for request, take in iteration.prefill:
            if request.request_id not in self._ids:
                continue
            request.prefilled += take
            self.prompt_tokens_total += take
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
            self._reserved -= request.prompt_tokens + request.max_new_tokens
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
                )
            )
