"""Request plumbing shared by the chat and completions routes: from a request to the engine.

Turns a validated request into ``SamplingParams`` (defaults, limits, the context check of
``context_length.py``), refuses what the queue could never hold, names its prompt-cache
session and pool, and submits it to the engine with every refusal mapped to an OpenAI error.
What comes back is ``generation.py``'s. Knows the engine's requests and OpenAI's error
shapes; knows nothing about chat templates or response formats.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from moeserve.server.engine.engine import EngineDeadError
from moeserve.server.engine.events import Event, GenerationRequest
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import ContextLengthError, KVBudgetError, QueueFullError
from moeserve.server.engine.session_keys import check_key, prompt_entry_key, scope_of
from moeserve.server.http.context_length import completion_limit, from_engine
from moeserve.server.http.deps import Runtime
from moeserve.server.http.errors import APIError, engine_down
from moeserve.server.http.protocol import SamplingFields

# OpenAPI: with ``stream: true`` the 200 answer is a server-sent event stream, not JSON.
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion, or with `stream: true` its chunks as server-sent "
        "events ending with `data: [DONE]`",
        # Each event: one ``data`` field holding a JSON chunk, or ``[DONE]`` at the end.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}},
                    "required": ["data"],
                }
            }
        },
    }
}


def new_id(prefix: str) -> str:
    """A response id such as ``chatcmpl-...``.

    Args:
        prefix: ``chatcmpl`` or ``cmpl``.

    Returns:
        The id.
    """
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(
    req: SamplingFields,
    runtime: Runtime,
    prompt_len: int,
    limit: int | None,
    *,
    logprobs: bool = False,
    top_logprobs: int = 0,
    prompt_param: str = "messages",
) -> SamplingParams:
    """Build the engine's parameters, applying defaults and refusing what cannot run.

    Args:
        req: The validated request.
        runtime: The runtime (limits, vocabulary).
        prompt_len: Prompt tokens.
        limit: The requested completion limit, or None for the default.
        logprobs: Return the chosen tokens' log-probabilities.
        top_logprobs: And this many alternatives.
        prompt_param: The request field holding the prompt, for errors.

    Returns:
        The parameters.

    Raises:
        APIError: 400 for a context overflow or a bad token id.
    """
    limit = completion_limit(runtime, prompt_len, limit, prompt_param)
    vocab = runtime.tokenizer.vocab_size
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    if any(not 0 <= k < vocab for k in bias):
        raise APIError(400, f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=bias or None,
        seed=req.seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        max_tokens=limit,
        min_tokens=min(req.min_tokens, limit),
        ignore_eos=req.ignore_eos,
        stop=req.stop_list(),
    )


def check_choices(runtime: Runtime, n: int, prompts: int = 1) -> None:
    """Refuse ``n`` over ``max_n``, and requests larger than the waiting queue can ever hold.

    A full queue is a 429 (retry later); a request larger than the whole queue would get
    that answer forever, so it is a 400 instead. Checked before any tokenising.

    Args:
        runtime: The runtime (its ``max_n`` and ``max_waiting`` settings).
        n: Choices per prompt.
        prompts: Prompts of the request (a legacy completion may have several).

    Raises:
        APIError: 400 naming ``n``.
    """
    if n > runtime.settings.max_n:
        raise APIError(400, f"n must be at most {runtime.settings.max_n}", param="n")
    sequences, limit = n * prompts, runtime.settings.max_waiting
    if sequences > limit:
        raise APIError(
            400,
            f"this request asks for {sequences} sequences (n times prompts); the server "
            f"queues at most {limit}",
            param="n",
        )


def session_key(req: SamplingFields, http: Request) -> str | None:
    """The prompt-cache session: ``prompt_cache_key``, else ``X-Session-ID``, else ``user``.

    The body fields are checked by ``SamplingFields``; the header is checked here, by the
    same rules (``session_keys.check_key``), read as UTF-8.

    Args:
        req: The request body.
        http: The HTTP request (headers).

    Returns:
        The key, or None.

    Raises:
        APIError: 400 for an ``X-Session-ID`` that is not a usable key.
    """
    header = http.headers.get("x-session-id")
    if header is not None:
        try:
            # Starlette decodes headers as latin-1; the key's text is their UTF-8 reading.
            header = check_key(header.encode("latin-1").decode("utf-8"))
        except (UnicodeError, ValueError) as e:
            reason = "must be valid UTF-8" if isinstance(e, UnicodeError) else str(e)
            raise APIError(400, f"X-Session-ID header: {reason}", param="X-Session-ID") from None
    return req.prompt_cache_key or header or req.user


def cache_scope(req: SamplingFields, http: Request) -> str:
    """The prompt-cache pool of a request: the caller's tenant, and its ``cache_salt``.

    Args:
        req: The request body.
        http: The HTTP request (its state holds the tenant, see ``app.APIKeyMiddleware``).

    Returns:
        The scope (``session_keys.scope_of``).
    """
    return scope_of(getattr(http.state, "tenant", ""), req.cache_salt)


def prompt_session(key: str | None, prompt: int) -> str | None:
    """The prompt-cache session of a request's ``prompt``-th prompt (``session_keys``).

    Args:
        key: The request's session key (``session_key``), or None.
        prompt: The prompt's number.

    Returns:
        The key of the prompt's entry, or None.
    """
    return None if key is None else prompt_entry_key(key, prompt)


async def submit(
    runtime: Runtime,
    requests: list[GenerationRequest],
    prompt_param: str = "messages",
    limit_param: str | None = "max_tokens",
) -> list[AsyncIterator[Event]]:
    """Hand a request's prompts to the engine, mapping refusals to OpenAI errors.

    All or none: when one prompt is refused, those already admitted are aborted.

    Args:
        runtime: The runtime.
        requests: One tokenised request per prompt.
        prompt_param: The request field holding the prompt, for errors.
        limit_param: The field to blame when the KV budget refuses: ``max_tokens`` when the
            request set its limit, None when the server chose it (then the prompt is too
            long for the budget by itself).

    Returns:
        One event iterator per request.

    Raises:
        APIError: 429 queue full, 400 context/KV budget/validation, 503 engine down.
    """
    streams = []
    try:
        for request in requests:
            streams.append(await _submit(runtime, request, prompt_param, limit_param))
    except APIError:
        for request in requests:
            runtime.engine.abort(request.request_id)
        raise
    return streams


async def _submit(
    runtime: Runtime, request: GenerationRequest, prompt_param: str, limit_param: str | None
) -> AsyncIterator[Event]:
    try:
        return await runtime.engine.submit(request)
    except QueueFullError as e:
        raise APIError(
            429,
            str(e),
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        ) from e
    except ContextLengthError as e:
        raise from_engine(e, prompt_param) from e
    except KVBudgetError as e:  # never fits, even alone: a 400, not "retry later"
        raise APIError(400, str(e), code="kv_cache_budget_exceeded", param=limit_param) from e
    except EngineDeadError as e:
        raise engine_down(str(e)) from e
    except ValueError as e:
        raise APIError(400, str(e)) from e
