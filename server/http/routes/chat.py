"""``POST /v1/chat/completions``: chat template in, OpenAI chat completion (or SSE chunks) out.

Knows the chat response shapes, streaming framing (role on the first content chunk, an empty
final delta carrying ``finish_reason``, an optional usage chunk, then ``[DONE]``) and errors
raised mid-stream (an error event, then ``[DONE]``); and which grammar a request's output must
follow (``response_format``, a required or named ``tool_choice``). Splitting the text into
content, ``reasoning_content`` and ``tool_calls`` is ``routes/chat_output.py``'s; generation
details live in ``routes/common.py``.
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
from server.http.protocol import ChatCompletion, ChatCompletionRequest, NamedToolChoice
from server.http.routes.chat_output import ChoiceAssembler, OutputConfig
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
from server.text.formats import MARKERS, detect_reasoning, tool_format
from server.text.tokenizer import TemplateError

router = APIRouter(tags=["chat"], responses=error_responses(400, 401, 404, 413, 429, 500, 503))


def render_prompt(runtime: Runtime, req: ChatCompletionRequest) -> tuple[list[int], str]:
    """Apply the model's chat template (tools included) and tokenise.

    Slow for a long conversation (tokenising a megabyte takes about a second): call it off
    the event loop. A text that cannot fit in the context is refused before tokenising.

    Args:
        runtime: The runtime.
        req: The request.

    Returns:
        Prompt token ids and the rendered text.

    Raises:
        APIError: 400 when the template rejects the conversation, or when the rendered text
            is too long in bytes for the context (``context_length_exceeded``).
    """
    try:
        text = runtime.tokenizer.apply_chat_template(
            [m.template_dict() for m in req.messages],
            tools=req.tool_dicts(),
            add_generation_prompt=True,
            **(req.chat_template_kwargs or {}),
        )
    except TemplateError as e:
        raise APIError(400, str(e), param="messages") from e
    check_prompt_bytes(runtime, text)
    return runtime.tokenizer.encode(text, add_special_tokens=False), text


def output_config(
    runtime: Runtime, req: ChatCompletionRequest, prompt_text: str, constrained: bool = False
) -> OutputConfig:
    """Decide how the generated text is split into content, reasoning and tool calls.

    Args:
        runtime: The runtime (the model's tool format and template).
        req: The request.
        prompt_text: The rendered prompt (its end tells whether generation starts inside a
            ``<think>`` block).
        constrained: The output follows a grammar (JSON or tool-call markup) from its first
            token; then none of it is reasoning, even after a prompt that opens ``<think>``.

    Returns:
        The per-request output configuration.
    """
    tools_on = bool(req.tools) and req.tool_choice != "none"
    named = isinstance(req.tool_choice, NamedToolChoice)
    reasoning = detect_reasoning(runtime.chat_template, prompt_text, runtime.vocabulary())
    return OutputConfig(
        tool_format=runtime.tool_format if tools_on else None,
        single_call=named or not req.parallel_tool_calls,
        reasoning=None if constrained else reasoning,
        tools=req.tool_dicts(),
    )


def kept_special_ids(runtime: Runtime, config: OutputConfig) -> frozenset[int]:
    """Special token ids whose text this request's parsers need (any format's markers).

    GLM-4.5's tool-call markers are special tokens, for instance; special tokens are
    otherwise dropped from the text.

    Args:
        runtime: The runtime.
        config: The request's output configuration.

    Returns:
        The ids (empty when no parser runs or no marker is a special token).
    """
    if config.tool_format is None and config.reasoning is None:
        return frozenset()
    vocab, special = runtime.vocabulary(), runtime.tokenizer.special_token_ids
    return frozenset(vocab[m] for m in MARKERS if m in vocab and vocab[m] in special)


async def build_constraint(runtime: Runtime, req: ChatCompletionRequest) -> Any:
    """The grammar a request's output must follow, if any.

    ``tool_choice`` ``required`` or a named function constrains the output to tool-call
    markup whose arguments follow the function's parameter schema; ``response_format``
    ``json_object`` / ``json_schema`` to JSON. Both at once is refused.

    Args:
        runtime: The runtime.
        req: The request.

    Returns:
        A ``server.engine.grammar.Constraint``, or None.

    Raises:
        APIError: 400 for a conflict, or a tool or response schema the grammar engine cannot
            compile (tools are checked whatever ``tool_choice`` says).
    """
    fmt = req.response_format.type if req.response_format else "text"
    named = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
    forced = bool(req.tools) and (req.tool_choice == "required" or named is not None)
    if forced and fmt != "text":
        raise APIError(
            400,
            "response_format cannot be combined with a required tool call",
            param="response_format",
        )
    compiler = runtime.grammar_compiler()
    if req.tools:
        tools = req.tool_dicts() or []
        if forced:
            names = [named] if named else [t["function"]["name"] for t in tools]
            parallel = req.parallel_tool_calls and not named
            syntax = tool_format(runtime.tool_format)
            job = (compiler.tool_calls, tools, names, syntax, parallel)
            return await _compile(job, "tools")
        # Not constrained, but a schema the grammar engine refuses is refused here too, as
        # OpenAI refuses it whatever tool_choice says.
        await _compile((compiler.check_tools, tools), "tools")
    if fmt == "json_object":
        return await _compile((compiler.json_object,), "response_format")
    if fmt == "json_schema":
        spec = req.response_format.json_schema
        job = (compiler.json_schema, spec.schema_, bool(spec.strict))
        return await _compile(job, "response_format")
    return None


async def _compile(job: tuple[Any, ...], param: str) -> Any:
    """Run a grammar compiler call off the event loop (it can take milliseconds).

    Args:
        job: The compiler method and its arguments.
        param: The request field to name when it fails.

    Returns:
        What the method returns.

    Raises:
        APIError: 400 ``invalid_schema`` naming ``param``.
    """
    from server.engine.grammar import GrammarError

    try:
        return await asyncio.to_thread(*job)
    except GrammarError as e:
        raise APIError(400, str(e), param=param, code="invalid_schema") from e


def logprobs_json(runtime: Runtime, items: list[TokenLogprob]) -> dict[str, Any]:
    """Chat-format ``logprobs`` for some tokens.

    Args:
        runtime: The runtime (for the tokens' raw bytes).
        items: From the engine.

    Returns:
        ``{"content": [...]}``.
    """
    raw = runtime.tokenizer.token_bytes
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(raw(lp.token_id)),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(raw(i))} for i, t, v in lp.top
                ],
            }
            for lp in items
        ]
    }


class _Stream:
    """Builds the SSE chunks of one streaming chat completion."""

    def __init__(
        self,
        runtime: Runtime,
        req: ChatCompletionRequest,
        rid: str,
        prompt_len: int,
        config: OutputConfig,
    ):
        self.runtime, self.req, self.rid, self.prompt_len = runtime, req, rid, prompt_len
        self.created = int(time.time())
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.role_sent: set[int] = set()
        self.choices = {i: ChoiceAssembler(config) for i in range(req.n)}

    def chunk(self, choices: list[dict[str, Any]], usage_: dict | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.req.model,
            "system_fingerprint": self.runtime.fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_
        return json.dumps(body)

    def _choice(self, index: int, delta: dict[str, Any], logprobs=None, finish=None) -> str:
        if index not in self.role_sent:  # the first chunk of a choice says who speaks
            self.role_sent.add(index)
            delta = {"role": "assistant", **delta}
        return self.chunk(
            [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        )

    def delta(self, event: DeltaEvent) -> list[str]:
        deltas = self.choices[event.index].feed(event.text) if event.text else []
        lp = logprobs_json(self.runtime, event.logprobs) if event.logprobs else None
        if not deltas and lp is not None:
            deltas = [{"content": ""}]  # logprobs of tokens whose text is still held back
        return [self._choice(event.index, d, lp if i == 0 else None) for i, d in enumerate(deltas)]

    def finish(self, event: FinishEvent) -> list[str]:
        assembler = self.choices[event.index]
        out = [self._choice(event.index, d) for d in assembler.finish()]
        if event.index not in self.role_sent:  # finished without any text: still say who spoke
            out.append(self._choice(event.index, {"content": ""}))
        reason = "tool_calls" if assembler.tool_calls else event.finish_reason
        out.append(self._choice(event.index, {}, finish=reason))
        return out

    def reasoning_tokens(self) -> int:
        encode = self.runtime.tokenizer.encode
        return sum(len(encode("".join(c.reasoning))) for c in self.choices.values() if c.reasoning)


async def _sse(
    runtime: Runtime, events: AsyncIterator[Event], stream: _Stream, request_id: str
) -> AsyncIterator[str]:
    timer = TokenTimer(runtime)
    completion, cached = 0, 0
    try:
        async for event in events:
            if isinstance(event, DeltaEvent):
                timer.delta(event)
                for data in stream.delta(event):
                    yield data
            elif isinstance(event, FinishEvent):
                completion += event.completion_tokens
                cached = event.cached_tokens
                for data in stream.finish(event):
                    yield data
            elif isinstance(event, ErrorEvent):
                err = APIError(500, event.message, type="server_error", code="generation_failed")
                yield json.dumps(err.body())
                yield "[DONE]"  # clients that wait for it stop here too
                return
        runtime.metrics.count_tokens(stream.prompt_len, completion, cached)
        if stream.include_usage:
            final = usage(stream.prompt_len, completion, cached)
            final["completion_tokens_details"] = {"reasoning_tokens": stream.reasoning_tokens()}
            yield stream.chunk([], final)
        yield "[DONE]"
    finally:
        runtime.engine.abort(request_id)  # a no-op when finished; frees the slot on disconnect


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAM_RESPONSE)
async def chat_completions(req: ChatCompletionRequest, runtime: RuntimeDep, http: Request):
    """Create a chat completion (streamed as server-sent events when ``stream`` is true).

    Args:
        req: The OpenAI request body.
        runtime: The server runtime.
        http: The HTTP request.

    Returns:
        A ``ChatCompletion``, or an SSE stream of ``chat.completion.chunk`` objects.
    """
    runtime.check_model(req.model)
    check_choices(runtime, req.n)
    prompt, prompt_text = await asyncio.to_thread(render_prompt, runtime, req)
    params = sampling_params(
        req,
        runtime,
        len(prompt),
        req.completion_limit(),
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
    )
    constraint = await build_constraint(runtime, req)
    config = output_config(runtime, req, prompt_text, constrained=constraint is not None)
    rid = new_id("chatcmpl")
    gen = GenerationRequest(
        rid,
        prompt,
        params,
        n=req.n,
        session_key=session_key(req, http),
        cache_scope=cache_scope(req, http),
        constraint=constraint,
        keep_special_ids=kept_special_ids(runtime, config),
    )
    events = await submit(runtime, gen)
    if req.stream:
        stream = _Stream(runtime, req, rid, len(prompt), config)
        return sse_response(runtime, _sse(runtime, events, stream, rid), http)
    collected = await collect(runtime, events, rid, http)
    return _response(runtime, req, rid, len(prompt), config, collected)


def _response(
    runtime: Runtime,
    req: ChatCompletionRequest,
    rid: str,
    prompt_len: int,
    config: OutputConfig,
    events: list[Event],
) -> dict[str, Any]:
    for event in events:
        if isinstance(event, ErrorEvent):
            raise APIError(500, event.message, type="server_error", code="generation_failed")
    texts: dict[int, list[str]] = {i: [] for i in range(req.n)}
    lps: dict[int, list[TokenLogprob]] = {i: [] for i in range(req.n)}
    finishes: dict[int, FinishEvent] = {}
    for event in events:
        if isinstance(event, DeltaEvent):
            texts[event.index].append(event.text)
            lps[event.index].extend(event.logprobs or [])
        elif isinstance(event, FinishEvent):
            finishes[event.index] = event
    if len(finishes) != req.n:
        raise APIError(499, "client closed the request", code="client_closed_request")
    completion = sum(f.completion_tokens for f in finishes.values())
    cached = finishes[0].cached_tokens
    runtime.metrics.count_tokens(prompt_len, completion, cached)
    choices, reasoning_tokens = [], 0
    for i in range(req.n):
        assembler = ChoiceAssembler(config)
        assembler.feed("".join(texts[i]))
        assembler.finish()
        if assembler.reasoning:
            reasoning_tokens += len(runtime.tokenizer.encode("".join(assembler.reasoning)))
        choices.append(
            {
                "index": i,
                "message": assembler.message(),
                "logprobs": logprobs_json(runtime, lps[i]) if req.logprobs else None,
                "finish_reason": "tool_calls"
                if assembler.tool_calls
                else finishes[i].finish_reason,
            }
        )
    body_usage = usage(prompt_len, completion, cached)
    body_usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": runtime.fingerprint,
        "choices": choices,
        "usage": body_usage,
    }
