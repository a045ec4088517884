"""``POST /v1/completions`` (legacy): raw prompts in, text completions out.

A prompt may be a string, a list of strings, a list of token ids or a list of id lists; each
prompt runs as its own engine request with ``n`` choices, and choice ``p * n + i`` is prompt
``p``'s choice ``i``, as OpenAI numbers them. LlamaIndex's ``OpenAILike(is_chat_model=False)``
lands here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from server.engine.events import (
    DeltaEvent,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    TokenLogprob,
)
from server.http.deps import Runtime, RuntimeDep
from server.http.errors import APIError, error_responses
from server.http.protocol import Completion, CompletionRequest
from server.http.routes.common import (
    STREAM_RESPONSE,
    TokenTimer,
    cache_scope,
    check_choices,
    check_prompt_bytes,
    collect,
    new_id,
    sampling_params,
    session_key,
    sse_response,
    submit,
    usage,
)

router = APIRouter(
    tags=["completions"], responses=error_responses(400, 401, 404, 413, 429, 500, 503)
)


def _legacy_logprobs(events: list[DeltaEvent], offset: int) -> dict[str, Any]:
    """The legacy ``logprobs`` object for some deltas, text offsets starting at ``offset``."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }

    def add(lp: TokenLogprob, at: int) -> None:
        out["tokens"].append(lp.token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({t: v for _, t, v in lp.top} or None)
        out["text_offset"].append(at)

    # A token's own text (U+FFFD for a partial character) need not be what it adds: byte
    # tokens combine into one character, and text held back (a partial character, a possible
    # stop-string prefix) comes out with a later delta. So tokens wait for the delta that
    # shows their text and are right-aligned within it, never before its start.
    pending: list[TokenLogprob] = []
    for event in events:
        pending.extend(event.logprobs or [])
        if not event.text:
            continue
        end = offset + len(event.text)
        tail = sum(len(lp.token) for lp in pending)
        for lp in pending:
            add(lp, max(offset, end - tail))
            tail -= len(lp.token)
        pending, offset = [], end
    for lp in pending:  # never shown: a special token, a trailing partial character
        add(lp, offset)
    return out


def _prompt_ids(runtime: Runtime, prompts: list[str | list[int]]) -> list[list[int]]:
    """Tokenise the text prompts and check the id lists; refuse what cannot fit or is bad."""
    tok, out = runtime.tokenizer, []
    for prompt in prompts:
        if isinstance(prompt, str):
            check_prompt_bytes(runtime, prompt, param="prompt")
            prompt = tok.encode(prompt, add_special_tokens=True)
        if not prompt or any(not 0 <= t < tok.vocab_size for t in prompt):
            raise APIError(400, "prompt token ids must be in the vocabulary", param="prompt")
        out.append(prompt)
    return out


async def _submit_all(runtime: Runtime, requests: list[GenerationRequest]) -> list[AsyncIterator]:
    streams = []
    try:
        for request in requests:
            streams.append(await submit(runtime, request))
    except APIError:
        for request in requests:
            runtime.engine.abort(request.request_id)
        raise
    return streams


@router.post("/v1/completions", response_model=Completion, responses=STREAM_RESPONSE)
async def completions(req: CompletionRequest, runtime: RuntimeDep, http: Request):
    """Create a text completion (streamed as server-sent events when ``stream`` is true).

    Args:
        req: The OpenAI request body.
        runtime: The server runtime.
        http: The HTTP request.

    Returns:
        A ``Completion``, or an SSE stream of ``text_completion`` chunks.
    """
    runtime.check_model(req.model)
    check_choices(runtime, req.n, len(req.prompts()))
    tok = runtime.tokenizer
    # Tokenising (or checking) megabytes of prompt takes seconds: off the event loop.
    prompts = await asyncio.to_thread(_prompt_ids, runtime, req.prompts())
    top = req.logprobs or 0
    rid = new_id("cmpl")
    requests = [
        GenerationRequest(
            f"{rid}-{p}",
            ids,
            sampling_params(
                req,
                runtime,
                len(ids),
                req.max_tokens,
                logprobs=req.logprobs is not None,
                top_logprobs=top,
                prompt_param="prompt",
            ),
            n=req.n,
            session_key=session_key(req, http),
            cache_scope=cache_scope(req, http),
        )
        for p, ids in enumerate(prompts)
    ]
    echoes = [tok.decode(ids) if req.echo else "" for ids in prompts]
    streams = await _submit_all(runtime, requests)
    if req.stream:
        return sse_response(runtime, _sse(runtime, req, rid, streams, prompts, echoes), http)
    per_prompt = await asyncio.gather(
        *[collect(runtime, s, r.request_id, http) for s, r in zip(streams, requests)]
    )
    return _response(runtime, req, rid, prompts, echoes, per_prompt)


def _response(runtime, req, rid, prompts, echoes, per_prompt: list[list[Event]]) -> dict:
    choices, completion, cached = [], 0, 0
    for p, events in enumerate(per_prompt):
        for event in events:
            if isinstance(event, ErrorEvent):  # say why, as chat and the streams do
                raise APIError(500, event.message, type="server_error", code="generation_failed")
        for i in range(req.n):
            deltas = [e for e in events if isinstance(e, DeltaEvent) and e.index == i]
            finish = [e for e in events if isinstance(e, FinishEvent) and e.index == i]
            if not finish:
                raise APIError(499, "client closed the request", code="client_closed_request")
            completion += finish[0].completion_tokens
            cached += finish[0].cached_tokens if i == 0 else 0
            choices.append(
                {
                    "index": p * req.n + i,
                    "text": echoes[p] + "".join(d.text for d in deltas),
                    "logprobs": _legacy_logprobs(deltas, len(echoes[p]))
                    if req.logprobs is not None
                    else None,
                    "finish_reason": finish[0].finish_reason,
                }
            )
    prompt_tokens = sum(len(p) for p in prompts)
    runtime.metrics.count_tokens(prompt_tokens, completion, cached)
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": runtime.fingerprint,
        "choices": choices,
        "usage": usage(prompt_tokens, completion, cached),
    }


async def _sse(runtime, req, rid, streams, prompts, echoes) -> AsyncIterator[str]:
    created, timer = int(time.time()), TokenTimer(runtime)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, stream: AsyncIterator[Event]) -> None:
        async for event in stream:
            await queue.put((p, event))
        await queue.put((p, None))

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        body = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": runtime.fingerprint,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = usage_
        return json.dumps(body)

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    open_streams, completion, cached = len(streams), 0, 0
    echoed: set[int] = set()
    try:
        while open_streams:
            p, event = await queue.get()
            if event is None:
                open_streams -= 1
                continue
            if isinstance(event, ErrorEvent):
                yield json.dumps(
                    APIError(
                        500, event.message, type="server_error", code="generation_failed"
                    ).body()
                )
                yield "[DONE]"
                return
            index = p * req.n + event.index
            prefix = echoes[p] if index not in echoed else ""
            echoed.add(index)
            if isinstance(event, DeltaEvent):
                timer.delta(event)
                lp = _legacy_logprobs([event], 0) if req.logprobs is not None else None
                if event.text or prefix or lp:
                    yield chunk(
                        [
                            {
                                "index": index,
                                "text": prefix + event.text,
                                "logprobs": lp,
                                "finish_reason": None,
                            }
                        ]
                    )
            elif isinstance(event, FinishEvent):
                completion += event.completion_tokens
                cached += event.cached_tokens if event.index == 0 else 0
                yield chunk(
                    [
                        {
                            "index": index,
                            "text": prefix,
                            "logprobs": None,
                            "finish_reason": event.finish_reason,
                        }
                    ]
                )
        prompt_tokens = sum(len(p) for p in prompts)
        runtime.metrics.count_tokens(prompt_tokens, completion, cached)
        if include_usage:
            yield chunk([], usage(prompt_tokens, completion, cached))
        yield "[DONE]"
    finally:
        for task in tasks:
            task.cancel()
        for p in range(len(streams)):
            runtime.engine.abort(f"{rid}-{p}")
