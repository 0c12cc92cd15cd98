"""The simulated runtime's server: a real HTTP process that speaks SGLang's API without a GPU.

Started like ``sglang.launch_server`` (``python -m agent.runtimes.simulated_server --model-path
M --host H --port P --tp-size N --served-model-name S --enable-metrics``) and answering
``/health`` (503 during warm-up and shutdown), ``/health_generate``, ``/server_info``,
``/v1/models``, ``/v1/loads``, ``/metrics`` (SGLang's metric names), ``/generate``,
``/v1/completions`` and ``/v1/chat/completions`` (streaming included). Timing comes from
:class:`~agent.runtimes.simulated_model.BatchingModel`, driven by the monotonic clock. SIGTERM
drains: health turns 503, new requests are refused with 503, in-flight ones finish, then the
process exits 0.

Text is placeholder words; prompts are cut into tokens of four characters (or taken exactly
from ``input_ids``; a chat message adds four tokens of its own for the role). The model keeps
a prefix cache like SGLang's radix cache: each prompt's tokens are hashed in blocks of
``--page-size`` tokens (64 by default; SGLang's default is 1), each block's BLAKE2b hash chained
over the blocks before it, so that requests sharing a prefix (a long system prompt, an earlier
turn of the conversation) prefill only what follows it. ``--disable-radix-cache`` turns that
off. The hit rate is ``sglang:cache_hit_rate`` in ``/metrics`` and ``cache_hit_rate`` in
``/v1/loads``; OpenAI usage blocks report ``prompt_tokens_details.cached_tokens`` when some
prompt tokens were cached (always with ``--enable-cache-report``), ``/generate`` reports
``meta_info.cached_tokens``.

A client that goes away (mid-stream, or while its request waits or prefills) aborts its request
in the model at once, as in SGLang. ``/server_info`` leaves out ``model_path`` unless
``--report-model-path`` is given: sglang-router tries to download a tokenizer for a worker that
reports one. A few flags inject faults for tests (``--crash-after-s``, ``--fail-health``). This
module must not import anything from the rest of the agent: it runs as its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.runtimes.simulated_model import (
    PREFIX_BLOCK_TOKENS,
    BatchingModel,
    GpuProfile,
    Progress,
    RequestRejected,
    profile_for_gpu,
)
from agent.runtimes.simulated_text import (
    E2E_BUCKETS,
    ITL_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    chat_tokens,
    prefix_hashes,
    text_tokens,
    words,
)

VERSION = "0.5.0-simulated"
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default for /generate; an assumption for OpenAI routes


class _Pending:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Progress] = asyncio.Queue()


class SimulatedServer:
    def __init__(self, args: argparse.Namespace, profile: GpuProfile) -> None:
        self.args = args
        self.profile = profile
        self.model = BatchingModel(
            profile, time.monotonic(), prefix_block_tokens=max(1, args.page_size)
        )
        self.pending: dict[str, _Pending] = {}
        self.started = time.monotonic()
        self.ready_at = self.started + args.warmup_s
        self.shutting_down = False
        self.ids = itertools.count(1)
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.requests_total = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self._last_token: dict[str, tuple[float, int]] = {}

    # -- the engine loop -----------------------------------------------------------------------

    async def engine(self) -> None:
        try:
            await self._engine()
        except Exception:  # a bug: die loudly so the supervisor restarts the replica
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)

    async def _engine(self) -> None:
        while True:
            now = time.monotonic()
            for update in self.model.advance(now):
                self._deliver(update)
            if self.shutting_down and not self.pending:
                self.drained.set()
            nxt = self.model.next_event_at()
            self.wake.clear()
            timeout = None if nxt is None else max(0.0, nxt - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    def _deliver(self, update: Progress) -> None:
        pending = self.pending.get(update.request_id)
        if update.first_token_at is not None and update.generated == 1:
            self.ttft.observe(update.first_token_at - update.arrived_at)
        last = self._last_token.get(update.request_id)
        if last is not None and update.generated > last[1]:
            self.itl.observe((update.at - last[0]) / (update.generated - last[1]))
        self._last_token[update.request_id] = (update.at, update.generated)
        if update.finished:
            self._last_token.pop(update.request_id, None)
            self.e2e.observe(update.at - update.arrived_at)
        if pending is not None:
            pending.queue.put_nowait(update)

    def ready(self) -> bool:
        return not self.shutting_down and time.monotonic() >= self.ready_at

    def prefix_blocks(self, tokens: Sequence[Any]) -> list[int] | None:
        """The prefix-cache block hashes of a prompt; None with ``--disable-radix-cache``."""
        if self.args.disable_radix_cache:
            return None
        return prefix_hashes(tokens, self.model.prefix_block_tokens)

    def start_request(
        self,
        prompt_tokens: int,
        max_new_tokens: int,
        stream: bool,
        prefix_blocks: Sequence[int] | None = None,
    ) -> str:
        """Queue a request; raises RequestRejected at once when it can never be served.
        Follow it with :meth:`following` straight away (no ``await`` in between)."""
        rid = f"{next(self.ids):x}-{uuid.uuid4().hex[:8]}"
        self.model.submit(
            rid,
            prompt_tokens,
            max_new_tokens,
            time.monotonic(),
            stream=stream,
            prefix_blocks=prefix_blocks,
        )
        self.requests_total += 1
        self.pending[rid] = _Pending()
        self.wake.set()
        return rid

    @contextlib.asynccontextmanager
    async def following(self, rid: str) -> AsyncIterator[AsyncIterator[Progress]]:
        """The progress of a started request, until it finishes. Leaving the block in any way
        (done, an error, or the handler cancelled because the client went away) forgets the
        request and, if it has not finished, cancels it in the model at once."""
        try:
            yield self._updates(self.pending[rid])
        finally:
            self.pending.pop(rid, None)
            self._last_token.pop(rid, None)
            self.model.cancel(rid)
            self.wake.set()

    @staticmethod
    async def _updates(pending: _Pending) -> AsyncIterator[Progress]:
        while True:
            update = await pending.queue.get()
            yield update
            if update.finished:
                return

    # -- handlers ------------------------------------------------------------------------------

    def _refuse(self) -> web.Response | None:
        if self.shutting_down:
            return _error(503, "the server is shutting down")
        if not self.ready():
            return _error(503, "the server is still starting")
        return None

    async def health(self, request: web.Request) -> web.Response:
        if self.args.fail_health or not self.ready():
            return web.Response(status=503)
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        if self.args.fail_health or not self.ready():
            return web.Response(status=503)
        async with self.following(self.start_request(1, 1, stream=False)) as updates:
            await _last(updates)
        return web.Response(status=200)

    def server_args(self) -> dict[str, Any]:
        a = self.args
        # No model_path unless asked: sglang-router would try to download its tokenizer.
        path = {"model_path": a.model_path} if a.report_model_path else {}
        return {
            **path,
            "served_model_name": a.served_model_name or a.model_path,
            "host": a.host,
            "port": a.port,
            "tp_size": a.tp_size,
            "dp_size": 1,
            "mem_fraction_static": a.mem_fraction_static,
            "max_running_requests": self.profile.max_running_requests,
            "max_total_tokens": self.profile.max_total_tokens,
            "chunked_prefill_size": self.profile.chunked_prefill_size,
            "context_length": self.profile.context_length,
            "page_size": self.model.prefix_block_tokens,
            "disable_radix_cache": a.disable_radix_cache,
            "enable_cache_report": a.enable_cache_report,
            "enable_metrics": a.enable_metrics,
        }

    async def server_info(self, request: web.Request) -> web.Response:
        stats = self.model.stats(time.monotonic())
        return web.json_response(
            {
                **self.server_args(),
                "version": VERSION,
                "simulated": {
                    "gpu_profile": self.profile.name,
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                    "pid": os.getpid(),
                },
                "internal_states": [
                    {
                        "last_gen_throughput": stats.gen_throughput,
                        "max_total_num_tokens": stats.max_total_tokens,
                    }
                ],
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.args.served_model_name or self.args.model_path,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "sglang",
                        "root": self.args.model_path,
                        "max_model_len": self.profile.context_length,
                    }
                ],
            }
        )

    async def loads(self, request: web.Request) -> web.Response:
        s = self.model.stats(time.monotonic())
        return web.json_response(
            {
                "timestamp": time.time(),
                "version": VERSION,
                "dp_rank_count": 1,
                "loads": [
                    {
                        "dp_rank": 0,
                        "num_running_reqs": s.running,
                        "num_waiting_reqs": s.queued,
                        "num_used_tokens": s.used_tokens,
                        "max_total_num_tokens": s.max_total_tokens,
                        "token_usage": s.token_usage,
                        "gen_throughput": s.gen_throughput,
                        "cache_hit_rate": s.cache_hit_rate,
                        "max_running_requests": self.profile.max_running_requests,
                    }
                ],
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.args.enable_metrics:
            return web.Response(status=404, text="metrics are off (--enable-metrics)")
        s = self.model.stats(time.monotonic())
        name = self.args.served_model_name or self.args.model_path
        labels = f'model_name="{name}"'
        lines: list[str] = []
        gauges = {
            "num_running_reqs": s.running,
            "num_queue_reqs": s.queued,
            "num_used_tokens": s.used_tokens,
            "token_usage": s.token_usage,
            "gen_throughput": s.gen_throughput,
            "cache_hit_rate": s.cache_hit_rate,
            "max_total_num_tokens": s.max_total_tokens,
            "max_running_requests": self.profile.max_running_requests,
        }
        for key, value in gauges.items():
            lines += [f"# TYPE sglang:{key} gauge", f"sglang:{key}{{{labels}}} {float(value)}"]
        counters = {
            "prompt_tokens_total": s.prompt_tokens_total,
            "cached_tokens_total": s.cached_tokens_total,
            "generation_tokens_total": s.generation_tokens_total,
            "num_requests_total": self.requests_total,
        }
        for key, value in counters.items():
            lines += [f"# TYPE sglang:{key} counter", f"sglang:{key}{{{labels}}} {float(value)}"]
        lines += self.ttft.lines("sglang:time_to_first_token_seconds", labels)
        lines += self.e2e.lines("sglang:e2e_request_latency_seconds", labels)
        lines += self.itl.lines("sglang:inter_token_latency_seconds", labels)
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refuse()) is not None:
            return refused
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        tokens: list[Any]
        if "input_ids" in body:
            tokens = body["input_ids"]
            if not isinstance(tokens, list) or not tokens:
                return _error(400, "input_ids must be a non-empty list of token ids")
        elif isinstance(body.get("text"), str):
            tokens = text_tokens(body["text"])
        else:
            return _error(400, "either text (a string) or input_ids is required")
        prompt = len(tokens)
        params = body.get("sampling_params") or {}
        max_new = _int(params.get("max_new_tokens"), DEFAULT_MAX_NEW_TOKENS)
        if max_new is None:
            return _error(400, "sampling_params.max_new_tokens must be a positive integer")
        started = time.monotonic()
        rid = uuid.uuid4().hex

        def meta(update: Progress) -> dict[str, Any]:
            return {
                "id": rid,
                "prompt_tokens": prompt,
                "completion_tokens": update.generated,
                "cached_tokens": update.cached_tokens,
                "finish_reason": {"type": "length", "length": update.generated}
                if update.finished
                else None,
                "e2e_latency": time.monotonic() - started,
            }

        stream = bool(body.get("stream"))
        try:
            started_id = self.start_request(prompt, max_new, stream, self.prefix_blocks(tokens))
        except RequestRejected as exc:
            return _error(400, str(exc))
        async with self.following(started_id) as updates:
            if not stream:
                last = await _last(updates)
                whole = {"text": words(0, last.generated), "meta_info": meta(last)}
                return web.json_response(whole)
            response = await _sse(request)
            async for update in updates:
                chunk = {"text": words(0, update.generated), "meta_info": meta(update)}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if (refused := self._refuse()) is not None:
            return refused
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        tokens: list[Any]
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return _error(400, "messages must be a non-empty list")
            if not all(isinstance(m, dict) for m in messages):
                return _error(400, "every message must be an object")
            tokens = chat_tokens(messages)
        else:
            text = body.get("prompt")
            if not isinstance(text, str | list) or not text:
                return _error(400, "prompt must be a non-empty string or list of token ids")
            tokens = text_tokens(text) if isinstance(text, str) else text
        prompt = len(tokens)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_new = _int(limit, DEFAULT_MAX_NEW_TOKENS)
        if max_new is None:
            return _error(400, "max_tokens must be a positive integer")
        model_name = self.args.served_model_name or self.args.model_path
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())

        def choice(text: str, finish: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            key = "delta" if delta else "message"
            content: dict[str, Any] = {"role": "assistant", "content": text}
            return {"index": 0, key: content, "logprobs": None, "finish_reason": finish}

        def usage(update: Progress) -> dict[str, Any]:
            out: dict[str, Any] = {
                "prompt_tokens": prompt,
                "completion_tokens": update.generated,
                "total_tokens": prompt + update.generated,
            }
            if update.cached_tokens or self.args.enable_cache_report:
                out["prompt_tokens_details"] = {"cached_tokens": update.cached_tokens}
            return out

        stream = bool(body.get("stream"))
        try:
            started_id = self.start_request(prompt, max_new, stream, self.prefix_blocks(tokens))
        except RequestRejected as exc:
            return _error(400, str(exc))
        async with self.following(started_id) as updates:
            if not stream:
                last = await _last(updates)
                return web.json_response(
                    {
                        "id": rid,
                        "object": kind,
                        "created": created,
                        "model": model_name,
                        "choices": [choice(words(0, last.generated), "length", delta=False)],
                        "usage": usage(last),
                    }
                )
            response = await _sse(request)
            sent = 0
            async for update in updates:
                finish = "length" if update.finished else None
                chunk: dict[str, Any] = {
                    "id": rid,
                    "object": kind + ".chunk" if chat else kind,
                    "created": created,
                    "model": model_name,
                    "choices": [choice(words(sent, update.generated - sent), finish, delta=True)],
                }
                if update.finished and (body.get("stream_options") or {}).get("include_usage"):
                    chunk["usage"] = usage(update)
                sent = update.generated
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
        return response

    # -- lifecycle -----------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        self.wake.set()

    async def crash_later(self) -> None:
        await asyncio.sleep(max(0.0, self.ready_at - time.monotonic()) + self.args.crash_after_s)
        print(f"simulated crash after {self.args.crash_after_s}s healthy", file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)


def _int(value: Any, default: int) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


async def _last(updates: AsyncIterator[Progress]) -> Progress:
    last: Progress | None = None
    async for update in updates:
        last = update
    assert last is not None
    return last


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object")
    return body


async def _sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


def _error(status: int, message: str) -> web.Response:
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 503: "ServiceUnavailableError"}
    kind = kinds.get(status, "Error")
    return web.json_response(
        {"object": "error", "message": message, "type": kind, "code": status}, status=status
    )


#: The routes an --api-key guards, as SGLang's does: serving requests, not health or metrics.
GUARDED = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/models")


def api_key_check(key: str | None) -> Any:
    """Middleware: with ``key``, the guarded routes need ``Authorization: Bearer <key>``."""

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        guarded = key is not None and request.path in GUARDED
        if guarded and request.headers.get("Authorization", "") != f"Bearer {key}":
            return _error(401, "missing or wrong API key")
        response: web.StreamResponse = await handler(request)
        return response

    return check


def build_app(server: SimulatedServer) -> web.Application:
    app = web.Application(middlewares=[api_key_check(server.args.api_key)])
    app.router.add_get("/health", server.health)
    app.router.add_get("/health_generate", server.health_generate)
    app.router.add_get("/server_info", server.server_info)
    app.router.add_get("/get_server_info", server.server_info)
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/v1/loads", server.loads)
    app.router.add_get("/metrics", server.metrics)
    app.router.add_post("/generate", server.generate)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.chat_completions)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A simulated SGLang server (no GPU needed).")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--served-model-name", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--mem-fraction-static", type=float, default=None)
    parser.add_argument("--enable-metrics", action="store_true")
    parser.add_argument("--api-key", default=None, help="requests must carry it as a bearer token")
    parser.add_argument(
        "--page-size",
        type=int,
        default=PREFIX_BLOCK_TOKENS,
        help="prefix-cache granularity, in tokens",
    )
    parser.add_argument("--disable-radix-cache", action="store_true", help="no prefix cache")
    parser.add_argument(
        "--enable-cache-report",
        action="store_true",
        help="always report usage.prompt_tokens_details.cached_tokens, even when 0",
    )
    parser.add_argument(
        "--report-model-path",
        action="store_true",
        help="put model_path in /server_info (sglang-router then fetches its tokenizer)",
    )
    parser.add_argument("--gpu-model", default="", help="GPU name choosing the speed profile")
    parser.add_argument("--max-running-requests", type=int, default=None)
    parser.add_argument("--speedup", type=float, default=1.0, help="run this many times faster")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="/health is 503 this long")
    parser.add_argument("--crash-after-s", type=float, default=None, help="fault: exit 3")
    parser.add_argument("--fail-health", action="store_true", help="fault: never healthy")
    return parser.parse_args(argv)


def make_profile(args: argparse.Namespace) -> GpuProfile:
    return profile_for_gpu(args.gpu_model).scaled(
        args.tp_size, args.speedup, args.max_running_requests
    )


def make_runner(server: SimulatedServer) -> web.AppRunner:
    # A client that goes away cancels its handler, which aborts its request, as in SGLang.
    return web.AppRunner(
        build_app(server), access_log=None, handle_signals=False, handler_cancellation=True
    )


async def serve(args: argparse.Namespace) -> int:
    server = SimulatedServer(args, make_profile(args))
    runner = make_runner(server)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        await runner.cleanup()
        return 1
    print(f"simulated SGLang serving {args.model_path} on {args.host}:{args.port}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.begin_shutdown)
    tasks = [asyncio.create_task(server.engine())]
    if args.crash_after_s is not None:
        tasks.append(asyncio.create_task(server.crash_later()))
    await server.drained.wait()
    # Let the last responses leave before the listening socket closes.
    await runner.cleanup()
    for task in tasks:
        task.cancel()
    print("simulated SGLang drained and stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.model_path).exists():
        print(f"model path {args.model_path} does not exist", file=sys.stderr)
        return 1
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
