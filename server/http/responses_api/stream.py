"""A streaming response: the engine's events as ``response.*`` server-sent events.

Each event is framed as ``event: <type>`` plus one ``data:`` line of JSON that repeats the
type and carries a ``sequence_number`` counting from 0, as OpenAI's. The stream opens with
``response.created`` and ``response.in_progress``, carries the output events
``output.OutputBuilder`` makes, and ends with ``response.completed`` (or
``response.incomplete`` when cut by ``max_output_tokens``) holding the whole response. A
generation that fails ends with ``response.failed`` (``error.code`` ``server_error``) and the
output made so far. There is no ``[DONE]``; the Responses API has none. A client that leaves
aborts the generation; a server shutting down ends the stream with ``drain.guard``'s error
payload (which the ``openai`` package raises as ``APIError``).

Knows SSE framing and the engine's events; the items are ``output.py``'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from sse_starlette.sse import ServerSentEvent

from moeserve.server.engine.events import DeltaEvent, ErrorEvent, FinishEvent
from moeserve.server.http.deps import Runtime
from moeserve.server.http.responses import sse_safe
from moeserve.server.http.responses_api.objects import (
    Event,
    ResponseError,
    ResponseEvent,
    ResponseObject,
)
from moeserve.server.http.responses_api.output import OutputBuilder, finished, usage
from moeserve.server.http.routes.chat import Started
from moeserve.server.http.routes.generation import Tally, TokenTimer


class EventWriter:
    """Numbers and frames one stream's events."""

    def __init__(self) -> None:
        self.sequence = 0

    def write(self, event: Event) -> ServerSentEvent:
        """One server-sent event.

        Args:
            event: The event (its ``sequence_number`` is set here).

        Returns:
            The framed event.
        """
        event.sequence_number = self.sequence
        self.sequence += 1
        data = sse_safe(event.model_dump_json(by_alias=True))
        return ServerSentEvent(data=data, event=event.type)


async def response_events(
    runtime: Runtime,
    started: Started,
    base: ResponseObject,
    on_done: Callable[[ResponseObject], None],
) -> AsyncIterator[ServerSentEvent]:
    """A streaming response's events, from ``response.created`` to its end.

    Args:
        runtime: The runtime (metrics, the engine to abort with).
        started: What ``chat.start`` submitted (one prompt, one choice).
        base: The response as it starts (``translate.echo``).
        on_done: Called with the final response when it completed or is incomplete (not
            when it failed or the client left): the route stores it there.

    Yields:
        The events.
    """
    writer, builder, tally = EventWriter(), OutputBuilder(started.config), started.tally
    timer = TokenTimer(runtime)
    yield writer.write(ResponseEvent(type="response.created", response=base))
    yield writer.write(ResponseEvent(type="response.in_progress", response=base))
    finish: FinishEvent | None = None
    try:
        async for event in started.streams[0]:
            if isinstance(event, DeltaEvent):
                timer.delta(event)
                for out in builder.feed(event.text, len(event.token_ids)):
                    yield writer.write(out)
            elif isinstance(event, FinishEvent):
                tally.add(event)
                finish = event
            elif isinstance(event, ErrorEvent):
                yield writer.write(_failed(base, builder, event.message))
                return
        if finish is None:  # the engine ended the stream without a finish: say so
            yield writer.write(_failed(base, builder, "the generation ended without finishing"))
            return
        for out in builder.finish(finish.finish_reason):
            yield writer.write(out)
        runtime.metrics.count_tokens(tally.prompt, tally.completion, tally.cached)
        final = final_response(runtime, base, builder, finish.finish_reason, tally)
        on_done(final)
        kind = "response.completed" if final.status == "completed" else "response.incomplete"
        yield writer.write(ResponseEvent(type=kind, response=final))
    finally:
        runtime.engine.abort(started.rid)  # a no-op when finished; frees the slot otherwise


def final_response(
    runtime: Runtime,
    base: ResponseObject,
    builder: OutputBuilder,
    finish_reason: str,
    tally: Tally,
) -> ResponseObject:
    """The response once its output is finished, with its usage (streamed or not).

    Args:
        runtime: The runtime (whether the prompt cache keeps turns).
        base: The response as it started.
        builder: Its output, finished.
        finish_reason: The engine's.
        tally: The token counts.

    Returns:
        The final response.
    """
    used = usage(tally, builder.reasoning_tokens, runtime.settings.prompt_cache)
    return finished(base, builder, finish_reason, used)


def _failed(base: ResponseObject, builder: OutputBuilder, message: str) -> ResponseEvent:
    """``response.failed``, with the items finished before the failure."""
    response = base.model_copy(
        update={
            "status": "failed",
            "error": ResponseError(code="server_error", message=message),
            "output": list(builder.items),
        }
    )
    return ResponseEvent(type="response.failed", response=response)
