"""Generated text as Anthropic content blocks: thinking, text and tool_use, and the stop reason.

The text is split by the chat pipeline's ``ChoiceAssembler`` (``routes/chat_output.py``:
the model's reasoning format and tool-call format), whose OpenAI deltas carry
``reasoning_content``, ``content`` or pieces of ``tool_calls``. ``ContentBuilder`` turns
that sequence into blocks: consecutive pieces of one kind extend one block, a new kind (or a
new tool call) closes it and opens the next. It returns the stream events that build each
block and keeps the blocks themselves, so a streamed message and a whole one hold the same
content in the same order. ``stop_reason`` maps the engine's finish onto Anthropic's reasons,
telling a stop sequence from the end of the turn. Knows the chat deltas and Anthropic's
shapes; knows nothing of HTTP or SSE framing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from moeserve.server.http.anthropic.responses import (
    ContentBlock,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    InputJsonDelta,
    StopReason,
    StreamEvent,
    TextContent,
    TextDelta,
    ThinkingContent,
    ThinkingDelta,
    ToolUseContent,
)
from moeserve.server.http.responses import Delta, ToolCallDelta
from moeserve.server.text.tokenizer import StopMatcher, Tokenizer


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments (a JSON object's text, as the formats promise) as an object.

    Args:
        arguments: The JSON text.

    Returns:
        The object; ``{}`` for text that is not one (a stream cut short).
    """
    try:
        value = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class ContentBuilder:
    """One message's content blocks, built from the chat deltas of its choice."""

    def __init__(self) -> None:
        self.blocks: list[ContentBlock] = []
        self._open: tuple[str, int] | None = None  # (kind, tool-call index or -1)
        self._json: list[str] = []  # the open tool call's input text so far

    def add(self, delta: Delta) -> list[StreamEvent]:
        """Take one chat delta.

        Args:
            delta: From ``ChoiceAssembler.feed`` / ``finish``.

        Returns:
            The events it makes: a block's start (after the previous one's stop), its deltas.
        """
        events: list[StreamEvent] = []
        if delta.reasoning_content:
            events += self._extend("thinking", delta.reasoning_content)
        if delta.content:
            events += self._extend("text", delta.content)
        for call in delta.tool_calls or []:
            events += self._tool(call)
        return events

    def close(self) -> list[StreamEvent]:
        """Close the open block, if any (at a new block, and at the end).

        Returns:
            Its ``content_block_stop``, or nothing.
        """
        if self._open is None:
            return []
        block = self.blocks[-1]
        if isinstance(block, ToolUseContent):
            block.input = tool_input("".join(self._json))
        self._open, self._json = None, []
        return [ContentBlockStop(index=len(self.blocks) - 1)]

    def _start(self, kind: tuple[str, int], block: ContentBlock) -> list[StreamEvent]:
        events = self.close()
        self._open = kind
        self.blocks.append(block)
        # The start event gets its own empty copy: the kept block grows as deltas arrive.
        empty = block.model_copy(deep=True)
        events.append(ContentBlockStart(index=len(self.blocks) - 1, content_block=empty))
        return events

    def _extend(self, kind: str, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._open != (kind, -1):
            block = ThinkingContent() if kind == "thinking" else TextContent()
            events = self._start((kind, -1), block)
        block = self.blocks[-1]
        index = len(self.blocks) - 1
        if isinstance(block, ThinkingContent):
            block.thinking += text
            events.append(ContentBlockDelta(index=index, delta=ThinkingDelta(thinking=text)))
        elif isinstance(block, TextContent):
            block.text += text
            events.append(ContentBlockDelta(index=index, delta=TextDelta(text=text)))
        return events

    def _tool(self, call: ToolCallDelta) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if call.id is not None:  # a call's first delta carries its id and name
            block = ToolUseContent(id=call.id, name=call.function.name or "")
            events = self._start(("tool_use", call.index), block)
        if call.function.arguments and self._open == ("tool_use", call.index):
            self._json.append(call.function.arguments)
            delta = InputJsonDelta(partial_json=call.function.arguments)
            events.append(ContentBlockDelta(index=len(self.blocks) - 1, delta=delta))
        return events


def matched_stop(tokenizer: Tokenizer, token_ids: Sequence[int], stops: list[str]) -> str | None:
    """Which stop sequence ended a choice, if one did.

    The engine cuts the text at the first stop string but reports only "stop"; the choice's
    tokens, decoded whole, still hold the string it cut at, and the same matcher finds it.

    Args:
        tokenizer: The served tokenizer.
        token_ids: Every token the choice generated (the engine's deltas' ids).
        stops: The request's ``stop_sequences``.

    Returns:
        The stop sequence, or None (the model ended its turn).
    """
    if not stops:
        return None
    matcher = StopMatcher(stops)
    matcher.feed(tokenizer.decode(list(token_ids)))
    return matcher.matched


def stop_reason(finish: str, tool_calls: bool, stop_sequence: str | None) -> StopReason:
    """Anthropic's ``stop_reason`` for a finished choice.

    Args:
        finish: The engine's finish reason (``stop``, ``length``, ``abort``).
        tool_calls: The answer holds complete tool calls.
        stop_sequence: The stop sequence that ended it (``matched_stop``), or None.

    Returns:
        ``max_tokens`` for a cut answer (even after complete calls, as chat says ``length``),
        else ``tool_use``, ``stop_sequence`` or ``end_turn``.
    """
    if finish == "length":
        return "max_tokens"
    if tool_calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"
