"""``create_app(settings)``: assembles the FastAPI application and nothing else.

Middleware (CORS, the request-body limit, the shutdown drain, API keys, request metrics), the
OpenAI error handlers and the routers are wired here; the model and the engine thread are
created in the lifespan, never at import, so tests can pass a ``runtime_factory`` that builds a
runtime around a tiny or fake engine.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.http.deps import Runtime
from server.http.drain import Drain, DrainMiddleware
from server.http.errors import APIError, install_handlers
from server.http.limits import BodyLimitMiddleware
from server.http.routes import admin, chat, completions
from server.http.routes import models as models_api

logger = logging.getLogger("moeserve")

RuntimeFactory = Callable[[Any], Runtime]
OPEN_PATHS = frozenset({"/health"})  # reachable without an API key (load balancers, Docker)


def tenant_id(api_key: str) -> str:
    """The tenant an API key stands for: a short digest, never the key itself.

    Prompt-cache entries and the session admin routes are scoped to it.

    Args:
        api_key: An accepted key.

    Returns:
        16 hex digits.
    """
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


class APIKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` (or ``api-key``) on every route but /health.

    A pure ASGI middleware rather than a route dependency so that it also covers ``/docs``,
    ``/openapi.json`` and unknown paths, and never buffers a streaming response.

    It records who is calling in the request's state, which routes read as
    ``request.state.tenant`` (``tenant_id`` of the matched key; "" without keys) and
    ``request.state.admin`` (an ``admin_api_keys`` key, or no keys configured at all).

    Args:
        app: The wrapped application.
        keys: Accepted keys; none turns authentication off.
        admin_keys: Keys that may also see and delete every tenant's sessions (accepted too).
    """

    def __init__(self, app: Any, keys: frozenset[str], admin_keys: frozenset[str] = frozenset()):
        self.app = app
        self.keys = {key.encode("utf-8"): tenant_id(key) for key in keys | admin_keys}
        self.admin_keys = frozenset(key.encode("utf-8") for key in admin_keys)

    def _match(self, headers: dict[bytes, bytes]) -> bytes | None:
        # Bytes throughout: a header may hold any byte, and compare_digest refuses non-ASCII
        # str (a 500 before, for anyone).
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        token = token or headers.get(b"api-key", b"")
        match = None
        for key in self.keys:  # constant time per key, and every key compared: no timing hint
            if hmac.compare_digest(token, key):
                match = key
        return match

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Pass authorised (or open) requests through; answer 401 otherwise."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["tenant"], state["admin"] = "", not self.keys
        if not self.keys or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        key = self._match(dict(scope["headers"]))
        if key is not None:
            state["tenant"], state["admin"] = self.keys[key], key in self.admin_keys
            await self.app(scope, receive, send)
            return
        err = APIError(
            401,
            "Invalid or missing API key (send 'Authorization: Bearer <key>')",
            code="invalid_api_key",
        )
        body = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Counts finished requests by route template and status."""

    def __init__(self, app: Any, fastapi_app: FastAPI) -> None:
        self.app, self.fastapi_app = app, fastapi_app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Run the request and count it once the response status is known."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            runtime = getattr(self.fastapi_app.state, "runtime", None)
            route = getattr(scope.get("route"), "path", "unmatched")
            if runtime is not None:
                runtime.metrics.count_request(route, status["code"])


def create_app(settings: Any, runtime_factory: RuntimeFactory | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: ``server.settings.Settings``.
        runtime_factory: Builds the runtime in the lifespan (default: load the configured
            model and start the engine thread).

    Returns:
        The FastAPI app.
    """
    factory = runtime_factory or _default_runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = factory(settings)
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            shutdown = getattr(runtime.engine, "shutdown", None)
            if shutdown is not None:
                shutdown()

    app = FastAPI(
        title="moeserve",
        description="OpenAI-compatible server for Mixture-of-Experts models on MLX",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = None
    install_handlers(app)
    for module in (chat, completions, models_api, admin):
        app.include_router(module.router)
    app.add_middleware(MetricsMiddleware, fastapi_app=app)
    app.add_middleware(
        APIKeyMiddleware,
        keys=settings.all_api_keys(),
        admin_keys=frozenset(settings.admin_api_keys),
    )
    # Outside the API key check: a draining server or an oversized body is refused before
    # anything else is looked at (and with CORS headers, CORS being outermost).
    app.state.drain = Drain(settings.shutdown_drain_seconds)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app


def model_fingerprint(served: Any, dtype: str | None) -> str:
    """Identify a model's KV format: config, dtype, and a digest of each weight file's head.

    Persisted prompt caches carry it, so a restart with another model (or another fine-tune
    of the same shape) never reuses them.

    Args:
        served: A ``server.startup.ServedModel``.
        dtype: The dtype the weights were loaded in.

    Returns:
        A hex digest.
    """
    from models.loader import weight_files

    digest = hashlib.sha256(json.dumps(served.loaded.config, sort_keys=True).encode())
    digest.update(str(dtype).encode())
    for file in weight_files(served.loaded.path):
        with file.open("rb") as f:
            digest.update(f.read(1 << 20))  # header + first tensors: cheap, and weight-specific
    return digest.hexdigest()[:32]


def _prompt_cache(settings: Any, served: Any) -> Any:
    from server.engine import kv_io
    from server.engine.prompt_cache import PromptCache, PromptCacheConfig

    config = PromptCacheConfig(
        max_bytes=settings.prompt_cache_max_bytes,
        ttl_seconds=settings.prompt_cache_ttl_seconds,
        directory=settings.prompt_cache_dir,
        fingerprint=model_fingerprint(served, settings.resolved_dtype()),
    )
    return PromptCache(config, encode=kv_io.tensors, load=kv_io.load)


def _default_template(served: Any) -> str:
    from server.text.chat_template import CHATML_TEMPLATE

    return served.tokenizer.chat_templates.get("default") or CHATML_TEMPLATE


def _tool_format(settings: Any, served: Any) -> str:
    """The tool-call format: the setting, else detected from the template, else qwen's."""
    if settings.tool_parser != "auto":
        return settings.tool_parser
    from models.loader import read_json
    from server.text.formats import DEFAULT_TOOL_FORMAT, detect_tool_format

    config = read_json(served.loaded.path / "tokenizer_config.json", required=False)
    vocabulary = served.tokenizer.backend.get_vocab()
    return detect_tool_format(_default_template(served), config, vocabulary) or DEFAULT_TOOL_FORMAT


def _default_runtime(settings: Any) -> Runtime:
    """Load the configured model, start the engine, print the summary line."""
    import time

    from server.engine.engine import Engine
    from server.http.metrics import Metrics
    from server.startup import load_served_model, summary_line

    served = load_served_model(settings)
    engine = Engine(
        served.loaded.model,
        served.tokenizer,
        settings.scheduler_config(served.max_model_len),
        prompt_cache=_prompt_cache(settings, served) if settings.prompt_cache else None,
    )
    engine.start()
    engine.grammar.ll_tokenizer  # noqa: B018  build llguidance's tokenizer now, not on a request
    runtime = Runtime(
        model_id=served.model_id,
        aliases=list(served.aliases),
        tokenizer=served.tokenizer,
        engine=engine,
        max_model_len=served.max_model_len,
        created=served.created or int(time.time()),
        settings=settings,
        metrics=Metrics(engine.stats),
        tool_format=_tool_format(settings, served),
        chat_template=_default_template(served),
    )
    logger.info("%s", summary_line(served, settings))
    return runtime
