"""Generated text made into a response's output items, with the stream events that tell it.

The text is split by chat's ``ChoiceAssembler`` (reasoning, content and tool calls per the
model's formats: nothing is parsed twice); its deltas become items in the order they come:
a ``reasoning`` item while the model thinks, a ``message`` item while it writes, one
``function_call`` item per call. At most one item is open at a time; a delta of another kind
closes it. Each item is announced (``response.output_item.added``, and for text its
``response.content_part.added``), grows by deltas, and is closed (``….done`` events, the item
in full). A streaming response sends these events; a whole response builds the same items
and drops them, so both answers have the same output.

A response that ends without any item gets an empty message, as OpenAI's does. An item cut
by ``max_output_tokens`` is ``incomplete``. Knows the items' shapes and the assembler's
deltas; knows nothing of HTTP, the engine or the store.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from moeserve.server.http.responses import Delta
from moeserve.server.http.responses_api.objects import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    Event,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    MessageItem,
    OutputItem,
    OutputItemEvent,
    OutputText,
    OutputTokensDetails,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
)
from moeserve.server.http.routes.chat_output import ChoiceAssembler, OutputConfig
from moeserve.server.http.routes.generation import Tally

_PREFIX = {"message": "msg", "reasoning": "rs", "function_call": "fc"}


def item_id(kind: str) -> str:
    """A new output item id, ``msg_…``, ``rs_…`` or ``fc_…`` as OpenAI's.

    Args:
        kind: The item type.

    Returns:
        The id.
    """
    return f"{_PREFIX[kind]}_{uuid.uuid4().hex}"


@dataclass
class _Open:
    """The item being written."""

    kind: str  # message | reasoning | function_call
    index: int  # its output_index
    id: str
    parts: list[str] = field(default_factory=list)  # its text (or arguments) so far
    call_id: str = ""  # a function call's
    name: str = ""


class OutputBuilder:
    """One response's output items, built from its generated text.

    Args:
        config: How the text splits (the chat pipeline's ``Started.config``).
    """

    def __init__(self, config: OutputConfig) -> None:
        self.assembler = ChoiceAssembler(config)
        self.items: list[OutputItem] = []  # closed items, in output order
        self._open: _Open | None = None

    def feed(self, text: str, tokens: int = 0) -> list[Event]:
        """Take newly generated text.

        Args:
            text: Engine text (may be empty).
            tokens: How many generated tokens it came from (for the reasoning tokens).

        Returns:
            The events it completes (``sequence_number`` not yet set).
        """
        return [e for delta in self.assembler.feed(text, tokens) for e in self._route(delta)]

    def finish(self, finish_reason: str) -> list[Event]:
        """Flush held-back text and close the open item.

        Args:
            finish_reason: The engine's (``length`` marks the last item ``incomplete``).

        Returns:
            The last events.
        """
        cut = finish_reason == "length"
        # A call the cut left unwritten is dropped by the assembler; one already announced
        # in a stream stays, marked incomplete (below), in both answers alike.
        events = [e for delta in self.assembler.finish(truncated=cut) for e in self._route(delta)]
        status: ItemStatus = "incomplete" if cut else "completed"
        if self._open is None and not self.items:
            events += self._start("message")  # an answer always has something to read
        events += self._close(status)
        return events

    @property
    def reasoning_tokens(self) -> int:
        """Generated tokens that were reasoning (``usage.output_tokens_details``)."""
        return self.assembler.reasoning_tokens

    def _route(self, delta: Delta) -> list[Event]:
        if delta.reasoning_content:
            return self._text("reasoning", delta.reasoning_content)
        if delta.content:
            return self._text("message", delta.content)
        events: list[Event] = []
        for call in delta.tool_calls or []:
            if call.id is not None:  # a call's first delta: a new item
                events += self._close("completed")
                events += self._start("function_call", call.id, call.function.name or "")
            opened = self._open
            if call.function.arguments and opened is not None:
                opened.parts.append(call.function.arguments)
                events.append(
                    ArgumentsDeltaEvent(
                        type="response.function_call_arguments.delta",
                        item_id=opened.id,
                        output_index=opened.index,
                        delta=call.function.arguments,
                    )
                )
        return events

    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open.kind != kind:
            events += self._close("completed")
            events += self._start(kind)
        opened = self._open
        assert opened is not None  # just started
        opened.parts.append(text)
        common = {"item_id": opened.id, "output_index": opened.index, "delta": text}
        if kind == "message":
            events.append(TextDeltaEvent(type="response.output_text.delta", **common))
        else:
            events.append(ReasoningDeltaEvent(type="response.reasoning_text.delta", **common))
        return events

    def _start(self, kind: str, call_id: str = "", name: str = "") -> list[Event]:
        opened = _Open(kind, len(self.items), item_id(kind), call_id=call_id, name=name)
        self._open = opened
        item = self._item(opened, "in_progress")
        events: list[Event] = [
            OutputItemEvent(type="response.output_item.added", output_index=opened.index, item=item)
        ]
        if kind != "function_call":
            part = OutputText(text="") if kind == "message" else ReasoningText(text="")
            events.append(self._part_event("response.content_part.added", opened, part))
        return events

    def _close(self, status: ItemStatus) -> list[Event]:
        opened, self._open = self._open, None
        if opened is None:
            return []
        text = "".join(opened.parts)
        where = {"item_id": opened.id, "output_index": opened.index}
        events: list[Event] = []
        if opened.kind == "message":
            events.append(TextDoneEvent(type="response.output_text.done", text=text, **where))
            part: OutputText | ReasoningText = OutputText(text=text)
            events.append(self._part_event("response.content_part.done", opened, part))
        elif opened.kind == "reasoning":
            kind = "response.reasoning_text.done"
            events.append(ReasoningDoneEvent(type=kind, text=text, **where))
            part = ReasoningText(text=text)
            events.append(self._part_event("response.content_part.done", opened, part))
        else:
            events.append(
                ArgumentsDoneEvent(
                    type="response.function_call_arguments.done",
                    name=opened.name,
                    arguments=text,
                    **where,
                )
            )
        item = self._item(opened, status)
        self.items.append(item)
        events.append(
            OutputItemEvent(type="response.output_item.done", output_index=opened.index, item=item)
        )
        return events

    @staticmethod
    def _part_event(kind: str, opened: _Open, part: OutputText | ReasoningText) -> Event:
        return ContentPartEvent(type=kind, item_id=opened.id, output_index=opened.index, part=part)

    @staticmethod
    def _item(opened: _Open, status: ItemStatus) -> OutputItem:
        """The item as it stands: empty while in progress, in full once closed."""
        text = "".join(opened.parts) if status != "in_progress" else ""
        if opened.kind == "message":
            content = [OutputText(text=text)] if status != "in_progress" else []
            return MessageItem(id=opened.id, status=status, content=content)
        if opened.kind == "reasoning":
            content = [ReasoningText(text=text)] if status != "in_progress" else []
            return ReasoningItem(id=opened.id, status=status, content=content)
        return FunctionCallItem(
            id=opened.id,
            status=status,
            call_id=opened.call_id,
            name=opened.name,
            arguments=text,
        )


def usage(tally: Tally, reasoning_tokens: int, caches: bool) -> ResponseUsage:
    """A response's ``usage``.

    Args:
        tally: The request's token counts.
        reasoning_tokens: Output tokens that were reasoning.
        caches: The server keeps finished turns in its prompt cache: then the prompt's new
            (uncached) tokens are written to the cache with the turn (within the cache's
            byte budget, which may evict them later).

    Returns:
        The usage.
    """
    written = tally.prompt - tally.cached if caches else 0
    return ResponseUsage(
        input_tokens=tally.prompt,
        input_tokens_details=InputTokensDetails(
            cached_tokens=tally.cached, cache_write_tokens=written
        ),
        output_tokens=tally.completion,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
        total_tokens=tally.prompt + tally.completion,
    )


def finished(
    base: ResponseObject, builder: OutputBuilder, finish_reason: str, used: ResponseUsage
) -> ResponseObject:
    """The response once generation ended: ``completed``, or ``incomplete`` when cut.

    Args:
        base: The response as it started (``translate.echo``).
        builder: Its output, finished.
        finish_reason: The engine's (``length``: cut by ``max_output_tokens`` or the context).
        used: Its usage.

    Returns:
        The final response object.
    """
    cut = finish_reason == "length"
    return base.model_copy(
        update={
            "status": "incomplete" if cut else "completed",
            "incomplete_details": IncompleteDetails() if cut else None,
            "output": list(builder.items),
            "usage": used,
        }
    )
