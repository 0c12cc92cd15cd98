"""The gateway's HTTP side: the aiohttp application, its handlers, and :class:`Gateway`, which
composes the policy, the fleet watch, the proxy and the metrics.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, SGLang's ``POST /generate``
(each also under a deployment's path prefix, ``/chat-eu/v1/chat/completions``), ``GET
/v1/models``, ``GET /health``, ``GET /metrics``. A request names its deployment by its path
prefix, else by its ``model`` field (the deployment's served model name, or the deployment's
own name; the only deployment when there is one and no model is given).

The body is parsed once, only to read ``model``, ``user`` and the prompt's beginning (the
affinity key); it is forwarded as it came. Hints ride in headers: ``x-session-id`` (the
affinity key) and ``x-spillway-priority: sheddable`` (refused first when the queue is full).
Every error is in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from common.configfile import InputError, read_secret_line
from common.schedulerlink import read_token
from decisions.endpoints import GatewayRouting
from gateway.config import GatewayConfig
from gateway.fleet import SchedulerLink
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.proxy import Call, Proxy, error_response
from gateway.targets import (
    CHAT,
    COMPLETIONS,
    GENERATE,
    Deployments,
    DeploymentState,
    PolicyFile,
)
from providers.catalog import Catalog

log = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"
PRIORITY_HEADER = "x-spillway-priority"
#: Path endings and the request kind each is.
SUFFIXES = (
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", COMPLETIONS),
    ("/generate", GENERATE),
)
#: How often queues are offered capacity that appears without an event (warm-up caps grow, an
#: adaptive limit probes or drops its unused part).
TICK_S = 0.2


def affinity_key(
    headers: Mapping[str, str], data: dict[str, Any], kind: str, routing: GatewayRouting
) -> str | None:
    """The session (``x-session-id``, else ``user``), else with ``routing.affinity`` the
    prompt's first ``affinity_prefix_chars`` characters (chat: the messages' contents in
    order)."""
    session = headers.get(SESSION_HEADER)
    if session:
        return "s:" + session
    user = data.get("user")
    if isinstance(user, str) and user:
        return "u:" + user
    if not routing.affinity:
        return None
    return _prompt_prefix(data, kind, routing.affinity_prefix_chars)


def _prompt_prefix(data: dict[str, Any], kind: str, limit: int) -> str | None:
    if kind == CHAT:
        text = _chat_prefix(data.get("messages"), limit)
    else:
        prompt = data.get("prompt" if kind == COMPLETIONS else "text")
        if prompt is None and kind == GENERATE:
            prompt = data.get("input_ids")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch: its first prompt
        if isinstance(prompt, list):
            text = ",".join(map(str, prompt[: max(1, limit // 4)]))  # token ids
        else:
            text = prompt[:limit] if isinstance(prompt, str) else ""
    return "p:" + text if text else None


def _chat_prefix(messages: object, limit: int) -> str:
    if not isinstance(messages, list):
        return ""
    parts: list[str] = []
    left = limit
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts: their text, in order
            content = "".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
            )
        if not isinstance(content, str) or not content:
            continue
        parts.append(content[:left])
        left -= len(parts[-1])
        if left <= 0:
            break
    return "".join(parts)


def _bind_failure(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another process holds the port)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "the host is not an address of this machine"
    return exc.strerror or str(exc)


class Gateway:
    """The whole gateway: :meth:`start`, serve, :meth:`stop`."""

    def __init__(self, config: GatewayConfig, *, catalog: Catalog | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.policy_file = PolicyFile(config.policy_file, catalog)
        replica_key = None
        if config.replica_api_key_file is not None:
            replica_key = read_secret_line(config.replica_api_key_file, "replica API key")
        self.deployments = Deployments(self.metrics, replica_key, catalog)
        self.proxy = Proxy(config, self.metrics)
        self.link = SchedulerLink(
            config,
            read_token(config.scheduler.token_file),
            self.deployments.fleet,
            self.deployments.traffic,
            rng=random.Random(),
        )
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        host, _ = self.config.host_port
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Serve; :class:`InputError` (one line, and nothing left running) when the listen
        address cannot be bound."""
        self.deployments.apply_policy(self.policy_file.load())
        await self.proxy.start()
        app = build_app(self)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=self.config.shutdown_grace_s,
        )
        await runner.setup()
        self._runner = runner
        host, port = self.config.host_port
        site = web.TCPSite(runner, host, port, backlog=4096)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise InputError(
                f"cannot listen on {self.config.listen} (listen): {_bind_failure(exc)}"
            ) from None
        self.port = int(runner.addresses[0][1])
        self._tasks = [
            asyncio.create_task(self.link.run(), name="fleet watch"),
            asyncio.create_task(self._watch_policy(), name="policy watch"),
            asyncio.create_task(self._tick(), name="queue tick"),
        ]
        log.info(
            "gateway %s serving %d deployments on %s (scheduler %s)",
            self.config.gateway_id,
            len(self.deployments.by_name),
            self.url,
            ", ".join(self.config.scheduler.address_list),
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.proxy.close()

    async def _watch_policy(self) -> None:
        while True:
            await asyncio.sleep(self.config.policy_reload_every_s)
            rejected = self.policy_file.rejected
            try:
                policy = self.policy_file.reload()
            except Exception:  # keep the policy in force, whatever happened
                log.exception("policy reload of %s failed", self.config.policy_file)
                continue
            if self.policy_file.rejected > rejected:
                self.metrics.policy_rejected.inc()
            if policy is not None:
                self.deployments.apply_policy(policy)
                log.info("policy %s reloaded", self.config.policy_file)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.metrics.fleet_connected.set(1 if self.link.state.connected else 0)
            self.deployments.pump_all()

    # -- handlers -----------------------------------------------------------------------------

    async def serve(
        self, request: web.Request, kind: str, dep: DeploymentState | None
    ) -> web.StreamResponse:
        arrived = time.monotonic()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413,
                f"the body is larger than {self.config.max_body_bytes} bytes",
                "invalid_request_error",
                "body_too_large",
            )
        try:
            data = json.loads(body)
        except ValueError:
            return self._bad("the request body is not valid JSON")
        if not isinstance(data, dict):
            return self._bad("the request body must be a JSON object")
        model = data.get("model")
        if dep is None:
            dep = self.deployments.resolve(model)
            if dep is None:
                if model is None:
                    return self._bad(
                        "model is required (or use a deployment's path prefix)", "model"
                    )
                return error_response(
                    404,
                    f"The model {model!r} does not exist here; GET /v1/models lists them",
                    "invalid_request_error",
                    "model_not_found",
                    param="model",
                )
        key = affinity_key(request.headers, data, kind, dep.routing)
        sheddable = request.headers.get(PRIORITY_HEADER, "").lower() == "sheddable"
        call = Call(kind, body, data, key, sheddable, arrived)
        try:
            return await self.proxy.handle(request, dep, call)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # a bug: answer it, keep serving
            log.exception("%s: request failed inside the gateway", dep.name)
            self.metrics.errors(dep.name, "internal").inc()
            return error_response(
                500, "the gateway failed; see its log", "server_error", "internal"
            )

    def _bad(self, message: str, param: str | None = None) -> web.Response:
        self.metrics.errors("", "bad_request").inc()
        return error_response(400, message, "invalid_request_error", "bad_request", param=param)

    async def prefixed(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        for suffix, kind in SUFFIXES:
            if path.endswith(suffix):
                dep = self.deployments.by_prefix.get(path[: -len(suffix)])
                if dep is not None:
                    return await self.serve(request, kind, dep)
                break
        return self._not_found(path)

    def _not_found(self, path: str) -> web.Response:
        return error_response(404, f"no route for {path}", "invalid_request_error", "not_found")

    async def models(self, request: web.Request) -> web.Response:
        path = request.path.removesuffix("/v1/models")
        if path:
            dep = self.deployments.by_prefix.get(path)
            if dep is None:
                return self._not_found(request.path)
            states = [dep]
        else:
            states = list(self.deployments.by_name.values())
        seen: dict[str, dict[str, Any]] = {}
        for state in states:
            assert state.spec is not None
            entry = {
                "id": state.spec.model,
                "object": "model",
                "created": 0,
                "owned_by": "spillway",
            }
            seen.setdefault(state.spec.model, entry)
        return web.json_response({"object": "list", "data": list(seen.values())})

    async def health(self, request: web.Request) -> web.Response:
        link = self.link.state
        return web.json_response(
            {
                "status": "ok",
                "gateway_id": self.config.gateway_id,
                "scheduler": "connected" if link.connected else "disconnected",
                "scheduler_error": None if link.connected else link.last_error,
                "replicas": len(self.deployments.fleet.replicas),
                "deployments": sorted(self.deployments.by_name),
            }
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def get_other(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/v1/models"):
            return await self.models(request)
        return self._not_found(request.path)


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=gateway.config.max_body_bytes)

    def kind_handler(kind: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await gateway.serve(request, kind, None)

        return handler

    for suffix, kind in SUFFIXES:
        app.router.add_post(suffix, kind_handler(kind))
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/metrics", gateway.metrics_page)
    app.router.add_post("/{tail:.*}", gateway.prefixed)
    app.router.add_get("/{tail:.*}", gateway.get_other)
    return app
