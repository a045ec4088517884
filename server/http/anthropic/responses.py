"""Anthropic Messages API response bodies and stream events (pydantic v2): what clients read.

A whole answer is a ``Message``; a stream is its events, each written as ``event: <type>``
plus one ``data:`` line holding the event's JSON (``stream.py``): ``message_start`` (the
message with no content yet), per content block ``content_block_start`` /
``content_block_delta`` / ``content_block_stop``, ``message_delta`` (the stop reason and the
final usage), ``message_stop``; ``ping`` and ``error`` between them. A model's field order is
its JSON's key order, and the shapes are the ones the ``anthropic`` package parses.

``MessageUsage`` follows Anthropic's accounting: ``input_tokens`` are the prompt tokens that were
computed, ``cache_read_input_tokens`` those reused from the prompt cache (the two add up to
the prompt), ``cache_creation_input_tokens`` always 0 (a session's cache is written without
being asked for, and costs nothing extra). Nothing here knows the engine or HTTP.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field


class TextContent(BaseModel):
    """A text block."""

    type: Literal["text"] = "text"
    text: str = ""


class ThinkingContent(BaseModel):
    """A reasoning block. The signature is empty: there is nothing to verify it with."""

    type: Literal["thinking"] = "thinking"
    thinking: str = ""
    signature: str = ""


class ToolUseContent(BaseModel):
    """A tool call: our call id, the tool's name, the input object."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


ContentBlock = Annotated[
    TextContent | ThinkingContent | ToolUseContent, Field(discriminator="type")
]


class MessageUsage(BaseModel):
    """Token accounting (see the module docstring for what each count holds)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def count(cls, prompt: int, completion: int, cached: int) -> MessageUsage:
        """Usage from the tally's counts.

        Args:
            prompt: Prompt tokens.
            completion: Generated tokens.
            cached: Prompt tokens reused from the prompt cache.

        Returns:
            The usage: the prompt split into computed and cache-read tokens.
        """
        return cls(
            input_tokens=prompt - cached, output_tokens=completion, cache_read_input_tokens=cached
        )


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Message(BaseModel):
    """``POST /v1/messages``'s answer (and, with no content yet, a stream's first event)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock] = Field(default_factory=list)
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage


class TokenCount(BaseModel):
    """``POST /v1/messages/count_tokens``'s answer: the rendered prompt's tokens."""

    input_tokens: int


# ----- stream events --------------------------------------------------------------------------


class MessageStart(BaseModel):
    """The first event: the message, empty."""

    type: Literal["message_start"] = "message_start"
    message: Message


class Ping(BaseModel):
    """Anthropic sends one early; clients skip it."""

    type: Literal["ping"] = "ping"


class ContentBlockStart(BaseModel):
    """A block opens, empty (a tool call with its id and name, its input still ``{}``)."""

    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDelta(BaseModel):
    """More text."""

    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(BaseModel):
    """More reasoning."""

    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class InputJsonDelta(BaseModel):
    """The next piece of a tool call's input, as JSON text (whole once the block stops)."""

    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDelta(BaseModel):
    """New content for the open block."""

    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Annotated[TextDelta | ThinkingDelta | InputJsonDelta, Field(discriminator="type")]


class ContentBlockStop(BaseModel):
    """The block is complete."""

    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class StopInfo(BaseModel):
    """``message_delta.delta``: why the message ended."""

    stop_reason: StopReason | None
    stop_sequence: str | None = None


class MessageDelta(BaseModel):
    """The stop reason and the final usage (the cache split is known only now)."""

    type: Literal["message_delta"] = "message_delta"
    delta: StopInfo
    usage: MessageUsage


class MessageStop(BaseModel):
    """The last event."""

    type: Literal["message_stop"] = "message_stop"


StreamEvent = (
    MessageStart
    | Ping
    | ContentBlockStart
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
)
