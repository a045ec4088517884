"""Generation plumbing shared by the chat and completions routes.

Turns a validated request into ``SamplingParams`` (defaults, limits, the context check),
submits it to the engine with every refusal mapped to an OpenAI error, watches for client
disconnects, and times tokens for the metrics. Knows the engine's events and OpenAI's
error shapes; knows nothing about chat templates or response formats.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from server.engine.engine import EngineDeadError
from server.engine.events import DeltaEvent, Event, GenerationRequest
from server.engine.sampling import SamplingParams
from server.engine.scheduler import ContextLengthError, QueueFullError
from server.engine.session_keys import check_key, scope_of
from server.http.deps import Runtime
from server.http.drain import drain_of, shutting_down
from server.http.errors import APIError
from server.http.protocol import SamplingFields

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
# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_SECONDS = 0.1


def new_id(prefix: str) -> str:
    """A response id such as ``chatcmpl-...``.

    Args:
        prefix: ``chatcmpl`` or ``cmpl``.

    Returns:
        The id.
    """
    return f"{prefix}-{uuid.uuid4().hex}"


def context_error(prompt: int, completion: int, limit: int, param: str = "messages") -> APIError:
    """400 ``context_length_exceeded`` in OpenAI's wording.

    Args:
        prompt: Prompt tokens.
        completion: Requested completion tokens.
        limit: The model's context length.
        param: ``messages`` (chat) or ``prompt`` (completions).

    Returns:
        The error.
    """
    message = str(ContextLengthError(prompt, completion, limit))
    if param == "prompt":  # the legacy endpoint's wording names the prompt
        message = message.replace("in the messages", "in your prompt").replace(
            "the messages or completion", "your prompt or completion"
        )
    return APIError(400, message, code="context_length_exceeded", param=param)


# How many times shorter (in UTF-8 bytes) a tokenizer normalizer can make a text. A Unicode
# normal form at most 4 (NFKC maps U+1D400, 4 bytes, to "A"); one that can delete text
# (Strip, StripAccents, BertNormalizer, Precompiled...) has no bound and is left out.
_SHRINK = {"NFC": 4.0, "NFD": 4.0, "NFKC": 4.0, "NFKD": 4.0, "Lowercase": 1.5, "Prepend": 1.0}


def _shrink(spec: dict[str, Any] | None) -> float | None:
    """The most a normalizer (its JSON form) shrinks text, or None when it is unbounded."""
    if spec is None:
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1.0
        for part in spec.get("normalizers", []):
            one = _shrink(part)
            if one is None:
                return None
            factor *= one
        return factor
    if kind == "Replace" and isinstance(spec.get("pattern"), dict):
        old = str(spec["pattern"].get("String", "")).encode()
        new = str(spec.get("content", "")).encode()
        return max(1.0, len(old) / len(new)) if old and new else None
    return _SHRINK.get(str(kind))


def prompt_byte_limit(runtime: Runtime) -> int | None:
    """The UTF-8 length above which a prompt cannot fit in the context (once per runtime).

    One token stands for at most the longest token's bytes of (normalized) text, so a text
    longer than ``max_model_len`` of those, times what the normalizer can shrink it by, is
    more than ``max_model_len`` tokens: it is refused without rendering it into tokens.

    Args:
        runtime: The runtime (tokenizer, context length).

    Returns:
        The limit in bytes, or None where the tokenizer allows no such bound (a normalizer
        that deletes text, unknown characters fused into one token).
    """
    if "prompt_byte_limit" not in runtime.extra:
        tok = runtime.tokenizer
        backend = getattr(tok, "backend", None)
        normalizer = getattr(backend, "normalizer", None)
        spec = json.loads(normalizer.__getstate__()) if normalizer is not None else None
        shrink = _shrink(spec)
        model = getattr(backend, "model", None)
        if getattr(model, "fuse_unk", False) and not getattr(model, "byte_fallback", False):
            shrink = None
        longest = max((len(tok.token_bytes(i)) for i in range(tok.vocab_size)), default=1)
        # 4: one unknown character (up to 4 bytes) may become one short <unk> token.
        per_token = max(longest, 4)
        limit = None if shrink is None else int(runtime.max_model_len * per_token * shrink)
        runtime.extra["prompt_byte_limit"] = limit
    return runtime.extra["prompt_byte_limit"]


def check_prompt_bytes(runtime: Runtime, text: str, param: str = "messages") -> None:
    """Refuse a prompt that is too long for the context before tokenising it.

    Tokenising megabytes takes seconds; measuring them takes microseconds (``str.isascii``
    is O(1), and a text short enough even at 4 bytes a character needs no encoding).

    Args:
        runtime: The runtime.
        text: The prompt text (rendered chat, or a completions prompt).
        param: ``messages`` or ``prompt``, for the error.

    Raises:
        APIError: 400 ``context_length_exceeded``.
    """
    limit = prompt_byte_limit(runtime)
    if limit is None or len(text) * 4 <= limit:
        return
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return
    limit_tokens = runtime.max_model_len
    what = "your messages are" if param == "messages" else "your prompt is"
    raise APIError(
        400,
        f"This model's maximum context length is {limit_tokens} tokens. However, {what} "
        f"{size} bytes long, more text than {limit_tokens} tokens can hold. Please reduce "
        f"the length of the {param}.",
        code="context_length_exceeded",
        param=param,
    )


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
    settings, room = runtime.settings, runtime.max_model_len - prompt_len
    if limit is None:
        limit = min(settings.default_max_tokens, room)
        if limit < 1:
            raise context_error(prompt_len, 1, runtime.max_model_len, prompt_param)
    elif limit > room:
        raise context_error(prompt_len, limit, runtime.max_model_len, prompt_param)
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


async def submit(runtime: Runtime, request: GenerationRequest) -> AsyncIterator[Event]:
    """Hand a request to the engine, mapping refusals to OpenAI errors.

    Args:
        runtime: The runtime.
        request: The tokenised request.

    Returns:
        The event iterator.

    Raises:
        APIError: 429 queue full, 400 context/validation, 503 engine down.
    """
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
        raise APIError(400, str(e), code="context_length_exceeded", param="messages") from e
    except EngineDeadError as e:
        raise engine_down(str(e)) from e
    except ValueError as e:
        raise APIError(400, str(e)) from e


def sse_response(
    runtime: Runtime, chunks: AsyncIterator[str], http: Request | None = None
) -> EventSourceResponse:
    """Stream ``chunks`` as server-sent events, with keepalive comments while a stream waits.

    The ``: keepalive`` comment lines (every ``sse_keepalive_seconds``) keep proxies from
    timing out during a long prefill; OpenAI clients ignore them. When the server drains for
    shutdown and its deadline passes, the stream ends with an error event and ``[DONE]``
    (``server/http/drain.py``).

    Args:
        runtime: The runtime (its settings give the interval).
        chunks: The ``data:`` payloads.
        http: The HTTP request (its app's drain); None: no shutdown deadline.

    Returns:
        The streaming response.
    """
    drain = drain_of(http.app) if http is not None else None
    return EventSourceResponse(
        drain.guard(chunks) if drain is not None else chunks,
        ping=runtime.settings.sse_keepalive_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment="keepalive"),
    )


def engine_down(message: str) -> APIError:
    """503 for a dead engine.

    Args:
        message: Why.

    Returns:
        The error.
    """
    return APIError(503, message, type="server_error", code="engine_unavailable")


class TokenTimer:
    """Observes time to first token and inter-token latency for one request."""

    def __init__(self, runtime: Runtime) -> None:
        self.metrics = runtime.metrics
        self.start = time.perf_counter()
        self.last: float | None = None

    def delta(self, event: DeltaEvent) -> None:
        """Record a delta's arrival.

        Args:
            event: The delta.
        """
        now = time.perf_counter()
        tokens = max(1, len(event.token_ids))
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            for _ in range(tokens):
                self.metrics.itl.observe((now - self.last) / tokens)
        self.last = now


async def collect(
    runtime: Runtime, events: AsyncIterator[Event], request_id: str, http: Request
) -> list[Event]:
    """Gather every event of a non-streaming request, aborting if the client leaves.

    Args:
        runtime: The runtime.
        events: From ``submit``.
        request_id: To abort on disconnect.
        http: The HTTP request.

    Returns:
        All events, in order.

    Raises:
        APIError: 503 ``shutting_down`` when the server's shutdown drain deadline passes.
    """
    timer = TokenTimer(runtime)
    out: list[Event] = []

    async def consume() -> None:
        async for event in events:
            if isinstance(event, DeltaEvent):
                timer.delta(event)
            out.append(event)

    drain = drain_of(http.app)
    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SECONDS)
            if not task.done() and drain is not None and drain.cut:
                task.cancel()
                raise shutting_down()  # the shutdown's drain deadline passed
            if not task.done() and await http.is_disconnected():
                task.cancel()
                break
        await task
    except asyncio.CancelledError:
        pass
    finally:
        runtime.engine.abort(request_id)  # harmless once finished; stops work if not
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's ``usage`` object.

    Args:
        prompt_tokens: Prompt tokens (each prompt counted once, not once per choice).
        completion_tokens: Generated tokens over all choices.
        cached_tokens: Prompt tokens reused from the prompt cache.

    Returns:
        The usage dictionary.
    """
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
