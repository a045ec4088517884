"""Operational routes: ``/health``, ``/metrics``, ``/tokenize``, ``/detokenize``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.deps import RuntimeDep
from server.errors import APIError, error_responses
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.tokenizer import TemplateError

router = APIRouter(tags=["admin"], responses=error_responses(400, 401, 404, 413, 503))


@router.get(
    "/health",
    responses={
        200: {"description": "Serving: the model id and the engine's queue sizes"},
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
    return JSONResponse({"status": "ok", "model": runtime.model_id, **runtime.engine.stats()})


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


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, runtime: RuntimeDep) -> dict:
    """Tokenise a prompt, or messages through the chat template.

    Args:
        req: ``prompt`` or ``messages``.
        runtime: The server runtime.

    Returns:
        ``{"tokens", "count", "max_model_len"}``.
    """
    runtime.check_model(req.model)
    tok = runtime.tokenizer
    if req.messages is not None:
        try:
            tokens = tok.tokenize_chat(
                [m.template_dict() for m in req.messages],
                add_generation_prompt=req.add_generation_prompt,
                tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                **(req.chat_template_kwargs or {}),
            )
        except TemplateError as e:
            raise APIError(400, str(e), param="messages") from e
    else:
        tokens = tok.encode(req.prompt or "", add_special_tokens=True)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": runtime.max_model_len}


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


@router.get("/v1/sessions")
async def list_sessions(runtime: RuntimeDep) -> dict:
    """List cached sessions: key, tokens, bytes and last use.

    Args:
        runtime: The server runtime.

    Returns:
        ``{"object": "list", "data": [...], "bytes": total}``.
    """
    cache = _prompt_cache(runtime)
    data, total = await runtime.engine.call(lambda: (cache.sessions(), cache.nbytes))
    return {"object": "list", "data": data, "bytes": total}


@router.delete("/v1/sessions/{key:path}")
async def drop_session(key: str, runtime: RuntimeDep) -> dict:
    """Forget one session's cache.

    Args:
        key: The session key.
        runtime: The server runtime.

    Returns:
        ``{"id": key, "deleted": true}``.
    """
    cache = _prompt_cache(runtime)
    if not await runtime.engine.call(lambda: cache.drop(key)):
        raise APIError(404, f"no cached session {key!r}", code="not_found", param="key")
    return {"id": key, "object": "session", "deleted": True}


@router.delete("/v1/sessions")
async def drop_all_sessions(runtime: RuntimeDep) -> dict:
    """Forget every cached session.

    Args:
        runtime: The server runtime.

    Returns:
        ``{"deleted": count}``.
    """
    cache = _prompt_cache(runtime)
    return {"object": "list", "deleted": await runtime.engine.call(cache.clear)}
