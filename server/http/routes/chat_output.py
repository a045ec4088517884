"""Turning one choice's generated text into OpenAI's message fields: content, reasoning, tools.

Text from the engine passes through the parser of the model's reasoning format (``<think>``
blocks become ``reasoning_content``) and then, when the request allows tool calls, through
the parser of the model's tool-call format (markup becomes ``tool_calls``); the formats live
in ``server/text/formats``. The same assembler serves both
the streaming path (each delta yields OpenAI ``delta`` dictionaries) and the non-streaming path
(``message()`` at the end). It knows OpenAI's shapes; it does not know the engine or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.text.formats import (
    ContentDelta,
    ReasoningFormat,
    ToolCallArgs,
    ToolCallStart,
    reasoning_format,
    tool_format,
)


@dataclass
class OutputConfig:
    """How a request's text is split (decided once per request)."""

    tool_format: str | None = None  # parse tool calls in this format; None: plain text
    single_call: bool = False  # parallel_tool_calls false (or a named function): keep one call
    reasoning: tuple[str, bool] | None = None  # (reasoning format name, starts_inside)
    tools: list[dict[str, Any]] | None = None  # the request's tools (the GLM parser types values)


@dataclass
class ChoiceAssembler:
    """Per-choice parsing state."""

    config: OutputConfig
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    _reasoning: ReasoningFormat | None = None
    _tools: Any = None
    _started: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.config.reasoning is not None:
            name, inside = self.config.reasoning
            self._reasoning = reasoning_format(name)(starts_inside=inside)
        if self.config.tool_format is not None:
            self._tools = tool_format(self.config.tool_format)(self.config.tools)

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Take newly generated text; return the OpenAI ``delta`` fields it completes.

        Args:
            text: Engine text (already cut at stop strings).

        Returns:
            Zero or more delta dictionaries (without ``role``).
        """
        return self._route(*self._split(text, final=False))

    def finish(self) -> list[dict[str, Any]]:
        """Flush held-back text at the end of the choice.

        Returns:
            The last delta dictionaries.
        """
        return self._route(*self._split("", final=True), final=True)

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self._reasoning is None:
            return "", text
        if final:
            reasoning, content = self._reasoning.feed(text) if text else ("", "")
            more_r, more_c = self._reasoning.finish()
            return reasoning + more_r, content + more_c
        return self._reasoning.feed(text)

    def _route(self, reasoning: str, content: str, final: bool = False) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if reasoning:
            self.reasoning.append(reasoning)
            deltas.append({"reasoning_content": reasoning})
        if self._tools is None:
            if content:
                self.content.append(content)
                deltas.append({"content": content})
            return deltas
        events = self._tools.feed(content) if content else []
        if final:
            events += self._tools.finish()
        for event in events:
            deltas.extend(self._tool_delta(event))
        return deltas

    def _tool_delta(self, event: Any) -> list[dict[str, Any]]:
        if isinstance(event, ContentDelta):
            if not event.text:
                return []
            self.content.append(event.text)
            return [{"content": event.text}]
        if self.config.single_call and event.index > 0:
            return []  # parallel_tool_calls=false: the first call only
        if isinstance(event, ToolCallStart):
            self._started.add(event.index)
            call = {
                "index": event.index,
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            return [{"tool_calls": [call]}]
        if isinstance(event, ToolCallArgs) and event.text:
            return [{"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}]
        return []

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The complete tool calls, OpenAI-shaped (empty when none)."""
        if self._tools is None:
            return []
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in self._tools.calls
        ]
        return calls[:1] if self.config.single_call else calls

    def message(self) -> dict[str, Any]:
        """The final assistant message (non-streaming).

        Returns:
            ``{"role", "content", ["reasoning_content"], ["tool_calls"]}``.
        """
        content = "".join(self.content)
        calls = self.tool_calls
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content or (None if calls else ""),
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if calls:
            message["tool_calls"] = calls
        return message
