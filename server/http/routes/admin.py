"""Operational routes: ``/health``, ``/metrics``, ``/tokenize``, ``/detokenize``, sessions.

``/v1/sessions`` lists and deletes prompt-cache sessions, scoped to the caller's tenant (its
API key, as ``APIKeyMiddleware`` records it); an ``admin_api_keys`` key reaches every tenant.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from moeserve.server.http.deps import Runtime, RuntimeDep
from moeserve.server.http.errors import APIError, error_responses
from moeserve.server.http.protocol import DetokenizeRequest, TokenizeRequest
from moeserve.server.text.tokenizer import TemplateError

router = APIRouter(tags=["admin"], responses=error_responses(400, 401, 404, 413, 503))


@router.get(
    "/health",
    responses={
        200: {
            "description": "Serving: the model id, the engine's queue sizes, KV cache use "
            "(kv_cache_bytes, kv_cache_tokens, preemptions) and its budget "
            "(kv_cache_max_bytes, null for none)"
        },
        503: {
            "description": "Loading, draining or engine down: `status` says which",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
)
async def health(http: Request) -> JSONResponse:
    """200 while the model is loaded and the engine thread alive, else 503.

    Args:
        http: The HTTP request.

    Returns:
        ``{"status": "ok"}`` or an error body.
    """
    runtime = getattr(http.app.state, "runtime", None)
    if runtime is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if not runtime.engine.healthy:
        return JSONResponse({"status": "engine_dead"}, status_code=503)
    budget = runtime.kv_budget.max_bytes if runtime.kv_budget is not None else None
    body = {"status": "ok", "model": runtime.model_id, **runtime.engine.stats()}
    return JSONResponse({**body, "kv_cache_max_bytes": budget})


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text exposition format"}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics.

    Args:
        runtime: The server runtime.

    Returns:
        The exposition text.
    """
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", response_model=dict[str, Any])
async def tokenize(req: TokenizeRequest, runtime: RuntimeDep) -> Response:
    """Tokenise a prompt, or messages through the chat template.

    Args:
        req: ``prompt`` or ``messages``.
        runtime: The server runtime.

    Returns:
        ``{"tokens", "count", "max_model_len"}``.
    """
    runtime.check_model(req.model)
    # Rendering, tokenising and writing out up to max_request_bytes of text take seconds (a
    # JSON list of millions of ids alone takes a third of one): off the event loop.
    body = await asyncio.to_thread(_tokenize, runtime, req)
    return Response(body, media_type="application/json")


def _tokenize(runtime: Runtime, req: TokenizeRequest) -> bytes:
    """``/tokenize``'s answer, as JSON bytes."""
    tok = runtime.tokenizer
    if req.messages is None:
        tokens = tok.encode(req.prompt or "", add_special_tokens=True)
    else:
        try:
            tokens = tok.tokenize_chat(
                [m.template_dict() for m in req.messages],
                add_generation_prompt=req.add_generation_prompt,
                tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                **(req.chat_template_kwargs or {}),
            )
        except TemplateError as e:
            raise APIError(400, str(e), param="messages") from e
    # json.dumps holds the GIL for a whole list (a quarter of a second for millions of ids),
    # which would stall the event loop as well: write the ids a slice at a time.
    step = 1 << 16
    ids = ",".join(",".join(map(str, tokens[i : i + step])) for i in range(0, len(tokens), step))
    tail = json.dumps(
        {"count": len(tokens), "max_model_len": runtime.max_model_len}, separators=(",", ":")
    )
    return f'{{"tokens":[{ids}],{tail[1:]}'.encode()


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, runtime: RuntimeDep) -> dict:
    """Turn token ids back into text.

    Args:
        req: The ids.
        runtime: The server runtime.

    Returns:
        ``{"prompt": text}``.
    """
    runtime.check_model(req.model)
    vocab = runtime.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return {"prompt": runtime.tokenizer.decode(req.tokens)}


def _prompt_cache(runtime):
    cache = getattr(runtime.engine, "prompt_cache", None)
    if cache is None:
        raise APIError(404, "the prompt cache is disabled on this server", code="not_found")
    return cache


def _tenant(http: Request) -> str | None:
    """Whose sessions the caller may see: its own tenant's, or everyone's for an admin key."""
    if getattr(http.state, "admin", False):
        return None
    return getattr(http.state, "tenant", "")


@router.get("/v1/sessions")
async def list_sessions(runtime: RuntimeDep, http: Request) -> dict:
    """List the caller's cached sessions (every tenant's for an admin key), in memory or on disk.

    Args:
        runtime: The server runtime.
        http: The HTTP request (its state names the caller's tenant).

    Returns:
        ``{"object": "list", "data": [...], "anonymous": {...}, "bytes": total}``: per
        session its key, scope, tokens, bytes, last use, pinned, persisted; ``anonymous``
        sums up the entries of requests without a session key (``entries``, ``tokens``,
        ``bytes``), which have no key to list; ``bytes`` is the caller's share of the prompt
        cache's memory (the whole of it for an admin key), sessions and anonymous entries.
    """
    cache, tenant = _prompt_cache(runtime), _tenant(http)
    data, anonymous, total = await runtime.engine.call(
        lambda: (cache.sessions(tenant), cache.anonymous(tenant), cache.nbytes_of(tenant))
    )
    return {"object": "list", "data": data, "anonymous": anonymous, "bytes": total}


@router.delete("/v1/sessions/{key:path}")
async def drop_session(key: str, runtime: RuntimeDep, http: Request) -> dict:
    """Forget one session's cache (in every pool of the caller's tenant; admin: of all).

    Args:
        key: The session key.
        runtime: The server runtime.
        http: The HTTP request.

    Returns:
        ``{"id": key, "deleted": true}``.
    """
    cache, tenant = _prompt_cache(runtime), _tenant(http)
    if not await runtime.engine.call(lambda: cache.drop(key, tenant)):
        raise APIError(404, f"no cached session {key!r}", code="not_found", param="key")
    return {"id": key, "object": "session", "deleted": True}


@router.delete("/v1/sessions")
async def drop_all_sessions(runtime: RuntimeDep, http: Request) -> dict:
    """Forget every cached entry of the caller's tenant (admin: of every tenant).

    Args:
        runtime: The server runtime.
        http: The HTTP request.

    Returns:
        ``{"deleted": count}``.
    """
    cache, tenant = _prompt_cache(runtime), _tenant(http)
    return {"object": "list", "deleted": await runtime.engine.call(lambda: cache.clear(tenant))}
