"""``POST /v1/chat/completions``: chat template in, OpenAI chat completion (or SSE chunks) out.

Renders the conversation into prompt tokens, refuses what cannot run, and decides which
grammar the output must follow (``response_format``, a required or named ``tool_choice``)
and how its text splits (``OutputConfig``). Splitting the text into content,
``reasoning_content`` and ``tool_calls``, and the chunks and body that carry them, are
``routes/chat_output.py``'s; the way to the engine is ``routes/common.py``'s, and the way
back ``routes/generation.py``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from moeserve.server.engine.events import Event, GenerationRequest
from moeserve.server.http.context_length import check_prompt_bytes
from moeserve.server.http.deps import Runtime, RuntimeDep
from moeserve.server.http.errors import APIError, error_responses
from moeserve.server.http.protocol import ChatCompletionRequest, NamedToolChoice
from moeserve.server.http.responses import ChatCompletion
from moeserve.server.http.routes import common, generation
from moeserve.server.http.routes.chat_output import ChatChunks, OutputConfig, chat_completion
from moeserve.server.text.formats import MARKERS, detect_reasoning, tool_format
from moeserve.server.text.tokenizer import TemplateError

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
    # A format that splits reasoning itself (harmony) parses every response, tools or not.
    splits = tool_format(runtime.tool_format).SPLITS_REASONING
    reasoning = None
    if not (constrained or splits):
        reasoning = detect_reasoning(runtime.chat_template, prompt_text, runtime.vocabulary())
    return OutputConfig(
        tool_format=runtime.tool_format if tools_on or splits else None,
        single_call=named or not req.parallel_tool_calls,
        reasoning=reasoning,
        tools=req.tool_dicts() if tools_on else None,
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
    from moeserve.server.engine.grammar import GrammarError

    try:
        return await asyncio.to_thread(*job)
    except GrammarError as e:
        raise APIError(400, str(e), param=param, code="invalid_schema") from e


@dataclass
class Started:
    """A conversation handed to the engine: what every API's route formats its answer from."""

    rid: str  # the response id (its prefix is the API's)
    prompt: list[int]  # the rendered prompt's token ids
    config: OutputConfig  # how the text splits into content, reasoning and tool calls
    streams: list[AsyncIterator[Event]]  # one per prompt (chat: always one)
    tally: generation.Tally  # token counts for usage


async def start(
    runtime: Runtime,
    req: ChatCompletionRequest,
    http: Request,
    id_prefix: str = "chatcmpl",
    limit_param: str | None = None,
) -> Started:
    """Render, constrain and submit one conversation: the pipeline every API shares.

    The OpenAI chat request is moeserve's one conversation model: the Anthropic Messages and
    OpenAI Responses routes translate their bodies into it and call this, so templates, tool
    formats, constraints, sampling and the prompt cache are written once.

    Args:
        runtime: The runtime.
        req: The conversation (an OpenAI chat request, possibly translated).
        http: The HTTP request (session headers, tenant).
        id_prefix: Prefix of the response id.
        limit_param: The field a KV-budget refusal blames; by default the chat limit the
            client set (none when it set none).

    Returns:
        What was started.

    Raises:
        APIError: Every refusal, in OpenAI's shape (other APIs re-shape it).
    """
    runtime.check_model(req.model)
    common.check_choices(runtime, req.n)
    prompt, prompt_text = await asyncio.to_thread(render_prompt, runtime, req)
    params = common.sampling_params(
        req,
        runtime,
        len(prompt),
        req.completion_limit(),
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
    )
    constraint = await build_constraint(runtime, req)
    config = output_config(runtime, req, prompt_text, constrained=constraint is not None)
    rid = common.new_id(id_prefix)
    gen = GenerationRequest(
        rid,
        prompt,
        params,
        n=req.n,
        session_key=common.session_key(req, http),
        cache_scope=common.cache_scope(req, http),
        constraint=constraint,
        keep_special_ids=kept_special_ids(runtime, config),
    )
    if limit_param is None:  # the limit the client set; none when it set none
        limit_param = next(
            (f for f in ("max_completion_tokens", "max_tokens") if getattr(req, f) is not None),
            None,
        )
    streams = await common.submit(runtime, [gen], limit_param=limit_param)
    return Started(rid, prompt, config, streams, generation.Tally(prompt=len(prompt)))


@router.post(
    "/v1/chat/completions", response_model=ChatCompletion, responses=common.STREAM_RESPONSE
)
async def chat_completions(req: ChatCompletionRequest, runtime: RuntimeDep, http: Request):
    """Create a chat completion (streamed as server-sent events when ``stream`` is true).

    Args:
        req: The OpenAI request body.
        runtime: The server runtime.
        http: The HTTP request.

    Returns:
        A ``ChatCompletion``, or an SSE stream of ``chat.completion.chunk`` objects.
    """
    started = await start(runtime, req, http)
    rid, config, streams, tally = started.rid, started.config, started.streams, started.tally
    if req.stream:
        writer = ChatChunks(runtime, req, rid, config)
        chunks = generation.stream_chunks(runtime, streams, [rid], writer, tally)
        return generation.sse_response(runtime, chunks, http)
    outputs = await generation.collect_choices(runtime, streams, [rid], http, req.n, tally)
    body = chat_completion(runtime, req, rid, config, outputs, tally)
    return Response(body.model_dump_json(), media_type="application/json")
