"""A streaming Anthropic message: the engine's events as Anthropic's server-sent events.

Each event is ``event: <type>`` and one ``data:`` line of JSON, in Anthropic's order:
``message_start`` (the prompt's tokens as ``input_tokens``), one ``ping``, then per content
block ``content_block_start``, its deltas, ``content_block_stop`` (``content.py`` builds the
blocks), then ``message_delta`` with the stop reason and the final usage, and
``message_stop``. The usage in ``message_start`` cannot split the prompt into computed and
cache-read tokens yet (the engine reports reuse when the choice ends), so ``message_delta``
carries the split; the ``anthropic`` package takes those counts over the first ones.

A generation that fails midway ends with an ``error`` event (``api_error``); so does a stream
the shutdown drain cuts (``overloaded_error``). A client that leaves aborts the engine
request: the response cancels this generator, whose ``finally`` aborts, as in
``routes/generation.py``, whose token timing this reuses. Keepalive comments fill the
silences as for chat streams. Knows the engine's events and SSE framing; knows nothing of
chat templates or tool formats.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from moeserve.server.engine.events import DeltaEvent, FinishEvent
from moeserve.server.http.anthropic.content import ContentBuilder, matched_stop, stop_reason
from moeserve.server.http.anthropic.errors import AnthropicError
from moeserve.server.http.anthropic.protocol import MessagesRequest
from moeserve.server.http.anthropic.responses import (
    Message,
    MessageDelta,
    MessageStart,
    MessageStop,
    MessageUsage,
    Ping,
    StopInfo,
    StreamEvent,
)
from moeserve.server.http.deps import Runtime
from moeserve.server.http.drain import drain_of
from moeserve.server.http.responses import sse_safe
from moeserve.server.http.routes.chat import Started
from moeserve.server.http.routes.chat_output import ChoiceAssembler
from moeserve.server.http.routes.generation import TokenTimer


def message_id(rid: str) -> str:
    """The message id Anthropic clients see (``msg_...``) for an engine request id.

    Args:
        rid: The request id from ``chat.start`` (``msg-<hex>``).

    Returns:
        ``msg_<hex>``.
    """
    return "msg_" + rid.split("-", 1)[-1]


def event(model: BaseModel) -> ServerSentEvent:
    """One server-sent event: the model's ``type`` as the event name, its JSON as the data.

    Args:
        model: A stream event (or ``AnthropicError``).

    Returns:
        The event.
    """
    return ServerSentEvent(data=sse_safe(model.model_dump_json()), event=model.type)


class MessageEvents:
    """Writes the events of one streaming message from its choice's engine events.

    Args:
        runtime: The runtime (the tokenizer, to name a stop sequence).
        req: The Anthropic request.
        started: What ``chat.start`` started (one choice).
    """

    def __init__(self, runtime: Runtime, req: MessagesRequest, started: Started) -> None:
        self.runtime, self.req, self.started = runtime, req, started
        self.assembler = ChoiceAssembler(started.config)
        self.content = ContentBuilder()
        self.token_ids: list[int] = []  # kept only to name the stop sequence

    def start(self) -> list[StreamEvent]:
        """``message_start`` (no content yet) and one ``ping``."""
        usage = MessageUsage(input_tokens=len(self.started.prompt), output_tokens=0)
        message = Message(id=message_id(self.started.rid), model=self.req.model, usage=usage)
        return [MessageStart(message=message), Ping()]

    def delta(self, delta: DeltaEvent) -> list[StreamEvent]:
        """The block events of new text.

        Args:
            delta: The engine's delta.

        Returns:
            The events (none while the parsers hold text back).
        """
        if self.req.stop_sequences:
            self.token_ids.extend(delta.token_ids)
        out: list[StreamEvent] = []
        for chat_delta in self.assembler.feed(delta.text) if delta.text else []:
            out += self.content.add(chat_delta)
        return out

    def finish(self, finish: FinishEvent) -> list[StreamEvent]:
        """The held-back text's events, the last block's stop, ``message_delta``, the end.

        Args:
            finish: The choice's finish (the tally has counted it).

        Returns:
            The events.
        """
        out: list[StreamEvent] = []
        # A call cut by max_tokens is dropped, never returned as text or as a complete call.
        for chat_delta in self.assembler.finish(truncated=finish.finish_reason == "length"):
            out += self.content.add(chat_delta)
        out += self.content.close()
        stops = self.req.stop_sequences or []
        matched = None
        if finish.finish_reason == "stop":
            matched = matched_stop(self.runtime.tokenizer, self.token_ids, stops)
        reason = stop_reason(finish.finish_reason, bool(self.assembler.tool_calls), matched)
        tally = self.started.tally
        usage = MessageUsage.count(tally.prompt, tally.completion, tally.cached)
        info = StopInfo(stop_reason=reason, stop_sequence=matched)
        return [*out, MessageDelta(delta=info, usage=usage), MessageStop()]


async def message_events(
    runtime: Runtime, req: MessagesRequest, started: Started
) -> AsyncIterator[ServerSentEvent]:
    """A streaming message's server-sent events.

    Args:
        runtime: The runtime (metrics, the engine to abort with).
        req: The Anthropic request.
        started: What ``chat.start`` started.

    Yields:
        The events; after a failure an ``error`` event, and nothing more.
    """
    writer = MessageEvents(runtime, req, started)
    timer, tally = TokenTimer(runtime), started.tally
    try:
        for item in writer.start():
            yield event(item)
        async for engine_event in started.streams[0]:
            if isinstance(engine_event, DeltaEvent):
                timer.delta(engine_event)
                items = writer.delta(engine_event)
            elif isinstance(engine_event, FinishEvent):
                tally.add(engine_event)
                items = writer.finish(engine_event)
            else:  # an ErrorEvent: the generation failed after it started
                yield event(AnthropicError.of(500, engine_event.message))
                return
            for item in items:
                yield event(item)
        runtime.metrics.count_tokens(tally.prompt, tally.completion, tally.cached)
    finally:
        runtime.engine.abort(started.rid)  # a no-op when finished; frees the slot otherwise


async def drain_farewell(
    items: AsyncIterator[ServerSentEvent | str],
) -> AsyncIterator[ServerSentEvent]:
    """Relay events; the drain's cut (OpenAI's error text, then ``[DONE]``) becomes ours.

    Args:
        items: The events, through the shutdown drain's guard.

    Yields:
        The events; at the cut one ``error`` event (``overloaded_error``) and no ``[DONE]``.
    """
    async for item in items:
        if isinstance(item, str):
            if item != "[DONE]":
                yield event(AnthropicError.of(503, "the server is shutting down"))
            continue
        yield item


def sse_response(
    runtime: Runtime, events: AsyncIterator[ServerSentEvent], http: Request
) -> EventSourceResponse:
    """Stream the events, with keepalive comments, cut at the shutdown drain's deadline.

    Args:
        runtime: The runtime (the keepalive interval).
        events: From ``message_events``.
        http: The HTTP request (its app's drain).

    Returns:
        The streaming response.
    """
    drain = drain_of(http.app)
    # The drain's guard relays any item, though typed for chat's text chunks.
    relayed = events if drain is None else drain_farewell(drain.guard(events))  # type: ignore
    return EventSourceResponse(
        relayed,
        ping=runtime.settings.sse_keepalive_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment="keepalive"),
    )
