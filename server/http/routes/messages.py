"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API.

The body is translated into the chat request (``anthropic/translate.py``) and run by the
shared pipeline, ``chat.start``: the same template, tool format, constraints, sampling and
prompt cache as ``/v1/chat/completions``. The answer is written back in Anthropic's shapes:
content blocks from the chat pipeline's text split (``anthropic/content.py``), a message or
its event stream (``anthropic/stream.py``). Every error on these paths is in Anthropic's
envelope (``errors.py`` asks the path). Knows both APIs' routes; the work is elsewhere.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from moeserve.server.http.anthropic import stream
from moeserve.server.http.anthropic.content import ContentBuilder, matched_stop, stop_reason
from moeserve.server.http.anthropic.errors import AnthropicError
from moeserve.server.http.anthropic.protocol import CountTokensRequest, MessagesRequest
from moeserve.server.http.anthropic.responses import Message, MessageUsage, TokenCount
from moeserve.server.http.anthropic.translate import to_chat
from moeserve.server.http.deps import Runtime, RuntimeDep
from moeserve.server.http.errors import error_responses
from moeserve.server.http.routes import chat, generation
from moeserve.server.http.routes.chat import Started
from moeserve.server.http.routes.chat_output import ChoiceAssembler
from moeserve.server.http.routes.generation import ChoiceOutput


def _anthropic_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI error answers of these routes: the statuses chat documents, our envelope."""
    return {s: {**doc, "model": AnthropicError} for s, doc in error_responses(*statuses).items()}


router = APIRouter(
    tags=["anthropic"], responses=_anthropic_errors(400, 401, 404, 413, 429, 500, 503)
)

# OpenAPI: with ``stream: true`` the 200 answer is Anthropic's server-sent events.
_STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The message, or with `stream: true` its events as server-sent events "
        "(`event: <type>` and one `data:` line each), ending with `message_stop`",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                    "required": ["event", "data"],
                }
            }
        },
    }
}


def whole_message(
    runtime: Runtime, req: MessagesRequest, started: Started, output: ChoiceOutput
) -> Message:
    """The non-streaming answer: the choice's text as content blocks, its stop and usage.

    Args:
        runtime: The runtime (the tokenizer, to name a stop sequence).
        req: The Anthropic request.
        started: What ``chat.start`` started.
        output: The choice's collected output.

    Returns:
        The message.
    """
    assembler, content = ChoiceAssembler(started.config), ContentBuilder()
    # Fed delta by delta, as a stream is, so that both split the text alike.
    for chat_delta in [d for e in output.deltas for d in assembler.feed(e.text)]:
        content.add(chat_delta)
    finish, matched = output.finish.finish_reason, None
    # A call cut by max_tokens is dropped, never returned as text or as a complete call.
    for chat_delta in assembler.finish(truncated=finish == "length"):
        content.add(chat_delta)
    content.close()
    if finish == "stop":
        ids = [i for d in output.deltas for i in d.token_ids]
        matched = matched_stop(runtime.tokenizer, ids, req.stop_sequences or [])
    tally = started.tally
    return Message(
        id=stream.message_id(started.rid),
        model=req.model,
        content=content.blocks,
        stop_reason=stop_reason(finish, bool(assembler.tool_calls), matched),
        stop_sequence=matched,
        usage=MessageUsage.count(tally.prompt, tally.completion, tally.cached),
    )


@router.post("/v1/messages", response_model=Message, responses=_STREAM_RESPONSE)
async def create_message(req: MessagesRequest, runtime: RuntimeDep, http: Request):
    """Create a message (streamed as Anthropic's server-sent events when ``stream`` is true).

    Args:
        req: The Anthropic request body.
        runtime: The server runtime.
        http: The HTTP request.

    Returns:
        A ``Message``, or its event stream.
    """
    chat_req = to_chat(req, runtime.chat_template)
    started = await chat.start(runtime, chat_req, http, id_prefix="msg", limit_param="max_tokens")
    if req.stream:
        events = stream.message_events(runtime, req, started)
        return stream.sse_response(runtime, events, http)
    outputs = await generation.collect_choices(
        runtime, started.streams, [started.rid], http, 1, started.tally
    )
    body = whole_message(runtime, req, started, outputs[0])
    return Response(body.model_dump_json(), media_type="application/json")


@router.post("/v1/messages/count_tokens", response_model=TokenCount)
async def count_tokens(req: CountTokensRequest, runtime: RuntimeDep) -> TokenCount:
    """Count the tokens of a conversation as the chat template renders it.

    Args:
        req: The conversation (messages, system, tools).
        runtime: The server runtime.

    Returns:
        ``{"input_tokens": n}``: what ``usage`` would count for the same request.
    """
    runtime.check_model(req.model)
    chat_req = to_chat(req, runtime.chat_template)
    prompt, _ = await asyncio.to_thread(chat.render_prompt, runtime, chat_req)
    return TokenCount(input_tokens=len(prompt))
