"""Responses API answers (pydantic v2): the response object, its output items, its events.

Shapes follow what the ``openai`` package parses (``openai.types.responses``): a ``Response``
with its request's settings echoed, output items of type ``reasoning``, ``message`` and
``function_call``, ``usage`` with input and output token details, and for a stream one model
per ``response.*`` event kind, each with its ``sequence_number``. Bodies are written with
``model_dump_json(by_alias=True)`` (a JSON-schema format's ``schema`` key is an alias).
Nothing here knows the engine, HTTP or how the items are made.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from moeserve.server.http.responses_api.protocol import (
    FunctionTool,
    ReasoningConfig,
    ToolChoiceFunction,
)

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


# ----- output items ---------------------------------------------------------------------------


class OutputText(BaseModel):
    """A message's text."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []  # citations: never made here


class ReasoningText(BaseModel):
    """A reasoning item's text."""

    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class MessageItem(BaseModel):
    """The assistant's text."""

    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ReasoningItem(BaseModel):
    """What the model thought (its ``<think>`` text), in full; no summary is written."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    status: ItemStatus
    summary: list[Any] = []
    content: list[ReasoningText]


class FunctionCallItem(BaseModel):
    """A call of one of the request's functions; ``arguments`` is JSON text."""

    type: Literal["function_call"] = "function_call"
    id: str
    status: ItemStatus
    call_id: str
    name: str
    arguments: str


OutputItem = Annotated[MessageItem | ReasoningItem | FunctionCallItem, Field(discriminator="type")]


# ----- the response ---------------------------------------------------------------------------


class _Sparse(BaseModel):
    """A model whose None fields are left out of its JSON (echoed settings the client left out)."""

    @model_serializer(mode="wrap")
    def _leave_out_none(self, handler: SerializerFunctionWrapHandler):
        # No return annotation: the documented schema stays the model's own fields.
        return {k: v for k, v in handler(self).items() if v is not None}


class FormatEcho(_Sparse):
    """``text.format`` as echoed: the keys of its type (``name``, ``schema``, ... for a schema)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextEcho(_Sparse):
    """``text`` as echoed."""

    format: FormatEcho = FormatEcho()
    verbosity: str | None = None


class InputTokensDetails(BaseModel):
    """Part of ``usage``."""

    cached_tokens: int = 0  # prompt tokens reused from the prompt cache
    cache_write_tokens: int = 0  # prompt tokens written to a session's prompt-cache entry


class OutputTokensDetails(BaseModel):
    """Part of ``usage``."""

    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token accounting."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    """Why a response is ``incomplete``."""

    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(BaseModel):
    """Why a response ``failed``."""

    code: str
    message: str


class ResponseObject(BaseModel):
    """A response: its status, output items and usage, with the request's settings echoed."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    store: bool = True
    temperature: float = 1.0
    text: TextEcho = TextEcho()
    tool_choice: ToolChoiceFunction | Literal["none", "auto", "required"] = "auto"
    tools: list[FunctionTool] = []
    top_p: float = 1.0
    truncation: Literal["disabled"] = "disabled"  # a context overflow is a 400, never cut
    usage: ResponseUsage | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] = {}
    background: bool = False


class ResponseDeleted(BaseModel):
    """``DELETE /v1/responses/{id}``."""

    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# ----- stream events --------------------------------------------------------------------------


class Event(BaseModel):
    """A stream event: its ``type`` is also the SSE event name."""

    type: str
    sequence_number: int = 0  # set as the event is written


class ResponseEvent(Event):
    """``response.created`` / ``in_progress`` / ``completed`` / ``incomplete`` / ``failed``."""

    response: ResponseObject


class OutputItemEvent(Event):
    """``response.output_item.added`` / ``.done``."""

    output_index: int
    item: OutputItem


class ContentPartEvent(Event):
    """``response.content_part.added`` / ``.done``."""

    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText | ReasoningText


class TextDeltaEvent(Event):
    """``response.output_text.delta``."""

    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = []


class TextDoneEvent(Event):
    """``response.output_text.done``."""

    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = []


class ReasoningDeltaEvent(Event):
    """``response.reasoning_text.delta``."""

    item_id: str
    output_index: int
    content_index: int = 0
    delta: str


class ReasoningDoneEvent(Event):
    """``response.reasoning_text.done``."""

    item_id: str
    output_index: int
    content_index: int = 0
    text: str


class ArgumentsDeltaEvent(Event):
    """``response.function_call_arguments.delta``."""

    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(Event):
    """``response.function_call_arguments.done``."""

    item_id: str
    output_index: int
    name: str
    arguments: str
