"""``create_app(settings)``: assembles the FastAPI application and nothing else.

Middleware (CORS, the request-body limit, the shutdown drain, API keys, request metrics), the
OpenAI error handlers and the routers are wired here; the model and the engine thread are
created in the lifespan, never at import, so tests can pass a ``runtime_factory`` that builds a
runtime around a tiny or fake engine.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeserve.server.http.asgi import HTTPMiddleware, send_json
from moeserve.server.http.deps import Runtime
from moeserve.server.http.drain import Drain, DrainMiddleware
from moeserve.server.http.errors import APIError, install_handlers
from moeserve.server.http.limits import BodyLimitMiddleware
from moeserve.server.http.routes import admin, chat, completions, messages, responses
from moeserve.server.http.routes import models as models_api
from moeserve.server.settings import Settings
from moeserve.server.startup import build_runtime

RuntimeFactory = Callable[[Settings], Runtime]
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


class APIKeyMiddleware(HTTPMiddleware):
    """Requires a key on every route but /health: ``Authorization: Bearer``, ``(x-)api-key``.

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

    def __init__(
        self, app: ASGIApp, keys: frozenset[str], admin_keys: frozenset[str] = frozenset()
    ) -> None:
        super().__init__(app)
        self.keys = {key.encode("utf-8"): tenant_id(key) for key in keys | admin_keys}
        self.admin_keys = frozenset(key.encode("utf-8") for key in admin_keys)

    def _match(self, headers: dict[bytes, bytes]) -> bytes | None:
        # Bytes throughout: a header may hold any byte, and compare_digest refuses non-ASCII
        # str (a 500 before, for anyone).
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        token = token or headers.get(b"api-key", b"") or headers.get(b"x-api-key", b"")
        match = None
        for key in self.keys:  # constant time per key, and every key compared: no timing hint
            if hmac.compare_digest(token, key):
                match = key
        return match

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass authorised (or open) requests through; answer 401 otherwise."""
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
            "Invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
            code="invalid_api_key",
        )
        await send_json(send, 401, err.body(scope["path"]), [(b"www-authenticate", b"Bearer")])


class MetricsMiddleware(HTTPMiddleware):
    """Counts finished requests by route template and status."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        super().__init__(app)
        self.fastapi_app = fastapi_app

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request and count it once the response status is known."""
        status = {"code": 500}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            runtime = getattr(self.fastapi_app.state, "runtime", None)
            if runtime is not None:
                runtime.metrics.count_request(self.route_of(scope), status["code"])

    def route_of(self, scope: Scope) -> str:
        """The path template a request was routed to, or ``unmatched``."""
        route = scope.get("route")
        if route is not None:
            return route.path
        # FastAPI records only its API routes in the scope; its documentation pages (/docs,
        # /openapi.json, /redoc) are plain Starlette routes, matched again here.
        for candidate in self.fastapi_app.routes:
            if candidate.matches(scope)[0] is not Match.NONE:
                return getattr(candidate, "path", "unmatched")
        return "unmatched"


def create_app(settings: Settings, runtime_factory: RuntimeFactory | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: The server settings.
        runtime_factory: Builds the runtime in the lifespan (default:
            ``server.startup.build_runtime``, which loads the configured model and starts the
            engine thread).

    Returns:
        The FastAPI app.
    """
    factory = runtime_factory or build_runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = factory(settings)
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            runtime.engine.shutdown()

    app = FastAPI(
        title="moeserve",
        description="OpenAI-compatible server for Mixture-of-Experts models on MLX",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = None
    install_handlers(app)
    for module in (chat, completions, messages, responses, models_api, admin):
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
