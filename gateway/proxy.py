"""Forwarding one request: route (or wait in the queue), send the body unchanged, stream the
answer back, retry once, and let go of everything the moment the client does.

- **Bytes pass through.** The request body is sent as it came (re-serialised only to rename the
  model for a managed endpoint that serves it under another name); the answer is written to the
  client as it arrives (``readany()``, no re-framing). One pooled :class:`aiohttp.ClientSession`
  serves every upstream.
- **Retries.** A connection failure, or a 5xx answer, before the first byte of the body is
  retried once on another target (the first is excluded; the retry may wait in the queue).
  Streams are forwarded from their first byte on, and the client's answer starts only then, so
  that a replica dying during a prefill is retried too; after the first byte has reached the
  client the client gets a clean error instead: an SSE ``error`` event, then the end of the
  stream and of the connection. Answers that are not streams (JSON, small) are read whole
  before they are sent: a failure in one is always before the first byte.
- **Cancellation.** The server cancels the handler when its client goes away (aiohttp's
  ``handler_cancellation``); the cancellation reaches the upstream call, whose connection is
  closed at once, so the replica aborts the request, also during a long prefill.
- **Admission.** Each attempt on a replica tells its slot's adaptive limit (see
  :mod:`gateway.targets`) when it was sent and, for a streamed answer, when the first chunk of
  the body arrived (SGLang writes it with the first token): that time since sending is the
  replica's time to first token. An answer read whole counts only by its full time, an upper
  bound of its time to first token (a fast sample when within the threshold, else nothing).
- **Health.** A replica whose connection fails is held back (it takes no request) until a
  ``/health`` probe passes: a killed replica stops getting traffic at once, not one report
  interval later.

The choice of target is :meth:`~gateway.targets.DeploymentState.try_acquire`'s (that is,
``route()``'s); nothing here picks one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any

import aiohttp
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.queue import Refused
from gateway.targets import GENERATE, DeploymentState, Slot

log = logging.getLogger(__name__)

TIER_HEADER = "x-spillway-tier"
TARGET_HEADER = "x-spillway-target"
_CONTENT_TYPE = "Content-Type"
_JSON = "application/json"
_UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)
#: Stream chunks kept to find the usage block at the end (no copy: references to the last few).
_TAIL_CHUNKS = 4


class Call:
    """What the gateway read of one request, once."""

    __slots__ = ("_renamed", "arrived", "body", "data", "key", "kind", "sheddable")

    def __init__(
        self,
        kind: str,
        body: bytes,
        data: dict[str, Any],
        key: str | None,
        sheddable: bool,
        arrived: float,
    ) -> None:
        self.kind = kind
        self.body = body
        self.data = data
        self.key = key
        self.sheddable = sheddable
        self.arrived = arrived
        self._renamed: dict[str, bytes] | None = None

    def body_for(self, slot: Slot) -> bytes:
        """The bytes to send to ``slot``: the body as it came, unless the slot is a managed
        endpoint with its own name for the model (the one case that re-serialises)."""
        model = slot.model
        if model is None or self.data.get("model") == model:
            return self.body
        if self._renamed is None:
            self._renamed = {}
        body = self._renamed.get(model)
        if body is None:
            body = self._renamed[model] = json.dumps({**self.data, "model": model}).encode()
        return body


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    *,
    param: str | None = None,
    retry_after_s: int | None = None,
) -> web.Response:
    """An error in OpenAI's shape; ``Retry-After`` on 429 and 503."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"Retry-After": str(retry_after_s or 1)} if status in (429, 503) else None
    return web.Response(
        body=json.dumps(body).encode(), status=status, content_type=_JSON, headers=headers
    )


class _Failure:
    """An attempt that failed before the client saw a byte: retried, or answered as is."""

    __slots__ = ("body", "kind", "message", "slot", "status")

    def __init__(self, kind: str, status: int, message: str, slot: Slot, body: bytes = b"") -> None:
        self.kind = kind
        self.status = status
        self.message = message
        self.slot = slot
        self.body = body

    def response(self) -> web.Response:
        detail = _upstream_message(self.body)
        message = f"{self.message}: {detail}" if detail else self.message
        kind = "upstream_error" if self.kind == "connect" else "server_error"
        response = error_response(
            self.status, message, kind, self.kind, retry_after_s=1 if self.status == 503 else None
        )
        response.headers[TIER_HEADER] = self.slot.tier_label
        response.headers[TARGET_HEADER] = self.slot.target_id
        return response


def _upstream_message(body: bytes) -> str:
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", errors="replace")
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(data.get("message"), str):
            return str(data["message"])
    return ""


def usage_of(obj: Any, kind: str) -> tuple[int, int] | None:
    """(input, output) tokens from an answer: OpenAI's ``usage``, SGLang's ``meta_info``."""
    if isinstance(obj, list):  # /generate with a batch of prompts
        pairs = [usage_of(o, kind) for o in obj]
        if not pairs or any(p is None for p in pairs):
            return None
        return (sum(p[0] for p in pairs if p), sum(p[1] for p in pairs if p))
    if not isinstance(obj, dict):
        return None
    block = obj.get("meta_info" if kind == GENERATE else "usage")
    if not isinstance(block, dict):
        return None
    prompt, completion = block.get("prompt_tokens"), block.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return (prompt, completion)
    return None


def usage_of_stream(tail: bytes, kind: str) -> tuple[int, int] | None:
    """The usage in the last SSE ``data:`` line that carries one (OpenAI sends it in a final
    chunk when asked with ``stream_options.include_usage``; SGLang's ``/generate`` in every
    chunk's ``meta_info``)."""
    needle = b'"meta_info"' if kind == GENERATE else b'"usage"'
    end = len(tail)
    while True:
        at = tail.rfind(needle, 0, end)
        if at < 0:
            return None
        start = tail.rfind(b"data:", 0, at)
        stop = tail.find(b"\n", at)
        if start < 0:
            return None
        try:
            found = usage_of(json.loads(tail[start + 5 : stop if stop >= 0 else None]), kind)
        except ValueError:
            found = None
        if found is not None:
            return found
        end = start


def _sse_error(message: str) -> bytes:
    error = {"message": message, "type": "upstream_error", "param": None, "code": "mid_stream"}
    return b"event: error\ndata: " + json.dumps({"error": error}).encode() + b"\n\n"


class Proxy:
    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._probes: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Proxy.start() first"
        return self._session

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            limit_per_host=0,
            ttl_dns_cache=30,
            keepalive_timeout=30,
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.config.connect_timeout_s,
            sock_read=self.config.read_timeout_s,
        )
        # No Accept-Encoding: answers come back uncompressed, so that the bytes are passed
        # on as they arrive, nothing is inflated here, and usage blocks can be read.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, skip_auto_headers=("Accept-Encoding",)
        )

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()
        if self._session is not None:
            await self._session.close()

    # -- one request ----------------------------------------------------------------------------

    async def handle(
        self, request: web.Request, dep: DeploymentState, call: Call
    ) -> web.StreamResponse:
        metrics = self.metrics
        exclude: frozenset[str] = frozenset()
        with_managed = call.kind != GENERATE
        failure: _Failure | None = None
        tier = "none"
        try:
            for attempt in range(2):
                try:
                    slot = await self._acquire(dep, call, exclude, with_managed)
                except Refused as refused:
                    dep.refused += 1
                    metrics.refusals(dep.name, refused.reason).inc()
                    if refused.reason == "queue_timeout":
                        metrics.queue_timeouts(dep.name).inc()
                    metrics.requests(dep.name, tier, str(refused.status)).inc()
                    kind = {429: "rate_limit_error", 404: "invalid_request_error"}.get(
                        refused.status, "service_unavailable"
                    )
                    return error_response(
                        refused.status,
                        f"{dep.name}: {refused.message}",
                        kind,
                        refused.reason,
                        retry_after_s=refused.retry_after_s,
                    )
                tier = slot.tier_label
                try:
                    result = await self._attempt(request, dep, slot, call)
                finally:
                    slot.settled(id(call))
                    dep.release(slot)
                if not isinstance(result, _Failure):
                    return result
                failure = result
                metrics.errors(dep.name, failure.kind).inc()
                exclude = exclude | {slot.target_id}
                if attempt == 0:
                    metrics.retries(dep.name).inc()
                    log.info(
                        "%s: %s failed before the first byte (%s); retrying elsewhere",
                        dep.name,
                        slot.target_id,
                        failure.message,
                    )
            assert failure is not None
            metrics.requests(dep.name, tier, str(failure.status)).inc()
            return failure.response()
        except asyncio.CancelledError:
            metrics.requests(dep.name, tier, "499").inc()  # the client went away
            raise

    async def _acquire(
        self, dep: DeploymentState, call: Call, exclude: frozenset[str], with_managed: bool
    ) -> Slot:
        queue = dep.queue
        if len(queue):
            queue.pump()  # those already waiting go first
        result = dep.try_acquire(call.key, exclude, with_managed)
        if isinstance(result, Slot):
            return result
        key = call.key
        return await queue.wait(
            lambda: dep.grant(key, exclude, with_managed),
            plain=with_managed and not exclude,
            sheddable=call.sheddable,
        )

    async def _attempt(
        self, request: web.Request, dep: DeploymentState, slot: Slot, call: Call
    ) -> web.StreamResponse | _Failure:
        url = slot.urls[call.kind]
        sent_at = time.monotonic()
        slot.sent(id(call), sent_at, call.data.get("stream") is True)
        try:
            resp = await self.session.post(url, data=call.body_for(slot), headers=slot.headers)
        except _UPSTREAM_ERRORS as exc:
            self._failed(slot, exc)
            return _Failure("connect", 502, f"{slot.target_id}: {_describe(exc)}", slot)
        try:
            status = resp.status
            if status >= 500:
                try:
                    text = await resp.read()
                except _UPSTREAM_ERRORS:
                    text = b""
                return _Failure(
                    "status_5xx", status, f"{slot.target_id} answered {status}", slot, text
                )
            ctype = resp.headers.get(_CONTENT_TYPE, _JSON)
            if ctype.startswith("text/event-stream"):
                return await self._stream(request, dep, slot, call, resp, ctype, sent_at)
            try:
                payload = await resp.read()
            except _UPSTREAM_ERRORS as exc:
                self._failed(slot, exc)
                return _Failure("connect", 502, f"{slot.target_id}: {_describe(exc)}", slot)
            found = None
            if status == 200:
                now = time.monotonic()
                slot.answered(id(call), now - sent_at, now)
                try:
                    found = usage_of(json.loads(payload), call.kind)
                except ValueError:
                    found = None
            self._done(dep, slot, call, status, found or (0, 0))
            headers = {_CONTENT_TYPE: ctype, TIER_HEADER: slot.tier_label}
            headers[TARGET_HEADER] = slot.target_id
            return web.Response(body=payload, status=status, headers=headers)
        finally:
            resp.close()  # a no-op once the body was read whole (the connection is pooled)

    async def _stream(
        self,
        request: web.Request,
        dep: DeploymentState,
        slot: Slot,
        call: Call,
        resp: aiohttp.ClientResponse,
        ctype: str,
        sent_at: float,
    ) -> web.StreamResponse | _Failure:
        content = resp.content
        try:
            chunk = await content.readany()
        except _UPSTREAM_ERRORS as exc:  # nothing reached the client yet: retryable
            self._failed(slot, exc)
            return _Failure("connect", 502, f"{slot.target_id}: {_describe(exc)}", slot)
        if chunk and resp.status == 200:
            now = time.monotonic()
            slot.first_byte(id(call), now - sent_at, now)
        out = web.StreamResponse(
            status=resp.status,
            headers={
                _CONTENT_TYPE: ctype,
                "Cache-Control": "no-cache",
                TIER_HEADER: slot.tier_label,
                TARGET_HEADER: slot.target_id,
            },
        )
        tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        sent = 0
        try:
            await out.prepare(request)
            self.metrics.ttfb(dep.name, slot.tier_label).observe(time.monotonic() - call.arrived)
            while chunk:
                await out.write(chunk)
                sent += len(chunk)
                tail.append(chunk)
                try:
                    chunk = await content.readany()
                except _UPSTREAM_ERRORS as exc:
                    self.metrics.errors(dep.name, "mid_stream").inc()
                    self._failed(slot, exc)
                    log.warning("%s: %s failed mid-stream: %s", dep.name, slot.target_id, exc)
                    out.force_close()
                    await out.write(_sse_error(f"{slot.target_id}: {_describe(exc)}"))
                    break
            await out.write_eof()
        except ConnectionResetError:  # the client left while we wrote
            self.metrics.requests(dep.name, slot.tier_label, "499").inc()
            return out
        found = usage_of_stream(b"".join(tail), call.kind)
        if found is None:
            # No usage block in the stream (the client did not ask for one): estimate at four
            # bytes a token, from the request body and the streamed bytes. The SSE framing and
            # JSON around each token make this an overestimate of the output, by design on
            # the safe side for the overflow signal; exact counts need include_usage.
            found = (len(call.body) // 4, sent // 4)
        self._count(dep, slot, resp.status, found)
        return out

    def _done(
        self, dep: DeploymentState, slot: Slot, call: Call, status: int, usage: tuple[int, int]
    ) -> None:
        self.metrics.ttfb(dep.name, slot.tier_label).observe(time.monotonic() - call.arrived)
        self._count(dep, slot, status, usage)

    def _count(self, dep: DeploymentState, slot: Slot, status: int, usage: tuple[int, int]) -> None:
        dep.count(slot, usage[0], usage[1])
        self.metrics.requests(dep.name, slot.tier_label, str(status)).inc()

    # -- health ---------------------------------------------------------------------------------

    def _failed(self, slot: Slot, exc: BaseException) -> None:
        """Hold a replica back after a failed connection (not after a slow read)."""
        if slot.managed or slot.down or slot.gone:
            return
        if not isinstance(exc, aiohttp.ClientConnectionError) or isinstance(
            exc, aiohttp.ServerTimeoutError
        ):
            return
        slot.down = True
        log.warning(
            "replica %s unreachable (%s); held back until /health passes", slot.target_id, exc
        )
        task = asyncio.create_task(self._probe(slot), name=f"probe {slot.target_id}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, slot: Slot) -> None:
        self.metrics.replicas_down.inc()
        url = slot.urls["health"]
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.config.connect_timeout_s))
        try:
            while slot.down and not slot.gone and slot.urls.get("health") == url:
                try:
                    async with self.session.get(url, headers=slot.headers, timeout=timeout) as r:
                        if r.status == 200:
                            slot.down = False
                            log.info("replica %s answers /health again", slot.target_id)
                            slot.owner.queue.pump()
                            return
                except _UPSTREAM_ERRORS:
                    pass
                await asyncio.sleep(self.config.health_probe_interval_s)
        finally:
            self.metrics.replicas_down.dec()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
