"""OpenAI response bodies (pydantic v2): what clients read, whole or one chunk at a time.

The generation routes build every body and server-sent-event chunk from these models and
write it with ``model_dump_json`` (compact JSON in one pass through pydantic-core); the same
models document the routes in ``/docs``. A model's field order is its JSON's key order, and
the shapes are the ones the ``openai`` package parses.

Whether a key is null or absent follows OpenAI. A choice's ``logprobs`` and ``finish_reason``
are always there, null when they have no value, and so is a chunk's ``usage`` in a stream that
asked for usage (a stream that did not has no ``usage`` key: ``Envelope``); a message's
``reasoning_content`` and ``tool_calls`` are null when it has none. A delta, though, has only
the keys it changes: it and the tool-call pieces in it leave their None fields out
(``_Sparse``). Reasoning has two keys with the same text: ``reasoning_content`` (DeepSeek's
name, read by most clients) and ``reasoning`` (vLLM's newer name).

Nothing here knows the engine, the model or HTTP.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, model_serializer

_Usage = TypeVar("_Usage", bound="LegacyUsage")


class _Sparse(BaseModel):
    """A model whose ``_sparse`` fields are left out of the JSON when None, not sent as null."""

    _sparse: ClassVar[frozenset[str]] = frozenset()

    # A plain serializer: one dict comprehension, no second pass through pydantic's own (a
    # chunk per token is the hot path). Nested models in the dict serialise as themselves.
    @model_serializer(mode="plain")
    def _leave_out_none(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None or k not in self._sparse}


# ----- usage ----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    """Part of ``usage``."""

    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    """Part of ``usage``."""

    reasoning_tokens: int = 0


class LegacyUsage(BaseModel):
    """Token accounting of a legacy completion (no reasoning breakdown)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    @classmethod
    def count(
        cls: type[_Usage], prompt: int, completion: int, cached: int, **details: Any
    ) -> _Usage:
        """Usage from its counts.

        Args:
            prompt: Prompt tokens (each prompt counted once, not once per choice).
            completion: Generated tokens over all choices.
            cached: Prompt tokens reused from the prompt cache.
            **details: Further fields of the class (``completion_tokens_details``).

        Returns:
            The usage.
        """
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
            **details,
        )


class Usage(LegacyUsage):
    """Token accounting of a chat completion."""

    completion_tokens_details: CompletionTokensDetails


# ----- logprobs -------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    """An alternative token."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    """A generated token with its alternatives."""

    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    """``choices[i].logprobs`` of chat completions."""

    content: list[TokenLogprobOut] | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: one entry per token in each list."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


# ----- messages and deltas --------------------------------------------------------------------


class FunctionCall(BaseModel):
    """``tool_calls[i].function``: the name and the arguments as a JSON string."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call of an assistant message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """``choices[i].message``: every key always there (``content`` null beside tool calls)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text: clients read one name or the other
    tool_calls: list[ToolCall] | None = None


class FunctionDelta(_Sparse):
    """A piece of a streamed tool call's function: its name comes once, with the first piece."""

    _sparse: ClassVar[frozenset[str]] = frozenset({"name"})

    name: str | None = None
    arguments: str


class ToolCallDelta(_Sparse):
    """A piece of a streamed tool call: ``id`` and ``type`` come once, with the first piece."""

    _sparse: ClassVar[frozenset[str]] = frozenset({"id", "type"})

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(_Sparse):
    """``choices[i].delta`` of a chat chunk: what this chunk adds (``role`` on the first)."""

    _sparse: ClassVar[frozenset[str]] = frozenset(
        {"role", "content", "reasoning_content", "reasoning", "tool_calls"}
    )

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text: clients read one name or the other
    tool_calls: list[ToolCallDelta] | None = None


# ----- choices and bodies ---------------------------------------------------------------------


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice's piece of a chat completion chunk."""

    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class CompletionChoice(BaseModel):
    """One choice of a legacy completion, or its piece of a chunk."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class _Body(BaseModel):
    """What every completion body and chunk holds, in this order (subclasses narrow types)."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[Any]
    usage: Any = None


class ChatCompletion(_Body):
    """The non-streaming chat response."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_Body):
    """A chunk of a streamed chat response; ``usage`` only in the last, when asked for."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Completion(_Body):
    """The non-streaming legacy completion response."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: LegacyUsage


class CompletionChunk(_Body):
    """A chunk of a streamed legacy completion (the same ``object`` as the whole response)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: LegacyUsage | None = None


_NO_USAGE = {"usage"}
# Line breaks to Python's str.splitlines that JSON leaves raw (it escapes only U+0000-U+001F).
# A client that splits a decoded event stream into lines would cut a chunk at one of them.
_LINE_BREAKS = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def sse_safe(data: str) -> str:
    """JSON text safe to send as one ``data:`` line: no character any client reads as a break.

    Args:
        data: JSON text (from ``model_dump_json``).

    Returns:
        The same JSON value, with U+0085, U+2028 and U+2029 written as escapes.
    """
    if data.isascii():  # O(1) in CPython: the common case costs nothing
        return data
    for char, escape in _LINE_BREAKS:
        data = data.replace(char, escape)
    return data


class Envelope:
    """Writes a stream's chunks: one chunk model for the whole stream, its choices swapped in.

    A stream's ``id``, ``created``, ``model`` and ``system_fingerprint`` never change, so each
    chunk only sets its choices and usage on the same model before it is serialised: a chunk
    per token costs one serialisation, not a validation of the envelope as well.

    Args:
        kind: ``ChatCompletionChunk`` or ``CompletionChunk``.
        rid: The response id.
        model: The model name the request used.
        fingerprint: The ``system_fingerprint``.
        include_usage: The request's ``stream_options.include_usage``: ``usage`` is null until
            the last chunk; without it there is no ``usage`` key at all.
    """

    def __init__(
        self,
        kind: type[ChatCompletionChunk | CompletionChunk],
        rid: str,
        model: str,
        fingerprint: str,
        include_usage: bool,
    ) -> None:
        self.chunk = kind(
            id=rid,
            created=int(time.time()),
            model=model,
            system_fingerprint=fingerprint,
            choices=[],
        )
        self.include_usage = include_usage
        self._exclude = None if include_usage else _NO_USAGE

    def write(self, choices: list[Any], usage: LegacyUsage | None = None) -> str:
        """One chunk's ``data:`` payload.

        Args:
            choices: The chunk's choices (``ChatChunkChoice`` or ``CompletionChoice``).
            usage: The usage, for the last chunk.

        Returns:
            Compact JSON (``sse_safe``).
        """
        self.chunk.choices, self.chunk.usage = choices, usage
        return sse_safe(self.chunk.model_dump_json(exclude=self._exclude))


# ----- models ---------------------------------------------------------------------------------


class ModelCard(BaseModel):
    """An entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeserve"
    root: str
    context_length: int
    max_model_len: int


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
