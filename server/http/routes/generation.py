"""A generation request's events made into its answer: streamed chunks, or collected choices.

Chat and completions differ only in how a choice's output reads as JSON: a ``ChunkWriter``
each for streams, their own body for whole answers. The rest is the same for both and lives
here: merging the event streams of a request's prompts (choice ``p * n + i`` is prompt
``p``'s choice ``i``), timing tokens for the metrics, ending a failed stream with an error
event and ``[DONE]``, the usage chunk, token accounting, aborting what a departed client left
running, and for a whole answer, each choice's deltas with its finish (500 for a failure, 499
when the client left). Knows the engine's events and SSE framing; knows nothing of chat
templates or response shapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from moeserve.server.engine.events import DeltaEvent, ErrorEvent, Event, FinishEvent, TokenLogprob
from moeserve.server.http.deps import Runtime
from moeserve.server.http.drain import drain_of, shutting_down
from moeserve.server.http.errors import APIError, generation_failed
from moeserve.server.http.responses import sse_safe

# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_SECONDS = 0.1


@dataclass
class Tally:
    """A request's token counts, for ``usage`` and the metrics."""

    prompt: int  # each prompt once, not once per choice
    completion: int = 0  # over all choices
    cached: int = 0  # prompt tokens reused from the prompt cache

    def add(self, event: FinishEvent) -> None:
        """Count a finished choice.

        Args:
            event: The choice's finish.
        """
        self.completion += event.completion_tokens
        if event.index == 0:  # a prompt's choices all reuse the same cached prefix: count once
            self.cached += event.cached_tokens


class ChunkWriter(Protocol):
    """How one endpoint writes a stream's chunks (``data:`` payloads)."""

    include_usage: bool  # stream_options.include_usage: a usage chunk before [DONE]

    def delta(self, prompt: int, event: DeltaEvent) -> list[str]:
        """The chunks for new output of prompt ``prompt``'s choice ``event.index``."""
        ...

    def finish(self, prompt: int, event: FinishEvent) -> list[str]:
        """The chunks that end prompt ``prompt``'s choice ``event.index``."""
        ...

    def usage(self, tally: Tally) -> str:
        """The usage chunk."""
        ...


class TokenTimer:
    """Observes time to first token and inter-token latency for one request."""

    def __init__(self, runtime: Runtime) -> None:
        self.metrics = runtime.metrics
        self.start = time.perf_counter()
        self.last: float | None = None

    def delta(self, event: DeltaEvent) -> None:
        """Record a delta's arrival.

        Args:
            event: The delta.
        """
        now = time.perf_counter()
        tokens = max(1, len(event.token_ids))
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            for _ in range(tokens):
                self.metrics.itl.observe((now - self.last) / tokens)
        self.last = now


async def _merged(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """The events of every prompt's stream, as they come, with the prompt's number."""
    if len(streams) == 1:  # a chat, or a single prompt: no queue in the way
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

    async def pump(p: int, stream: AsyncIterator[Event]) -> None:
        async for event in stream:
            await queue.put((p, event))
        await queue.put((p, None))

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            p, event = await queue.get()
            if event is None:
                open_streams -= 1
            else:
                yield p, event
    finally:
        for task in tasks:
            task.cancel()


async def stream_chunks(
    runtime: Runtime,
    streams: list[AsyncIterator[Event]],
    request_ids: list[str],
    writer: ChunkWriter,
    tally: Tally,
) -> AsyncIterator[str]:
    """A streaming request's ``data:`` payloads, ending with ``[DONE]``.

    Args:
        runtime: The runtime (metrics, the engine to abort with).
        streams: One event stream per prompt, from ``submit``.
        request_ids: Their engine request ids.
        writer: Writes the endpoint's chunks.
        tally: The request's prompt tokens; the rest is counted here.

    Yields:
        JSON chunks; after a failure an error envelope, then ``[DONE]`` either way.
    """
    timer = TokenTimer(runtime)
    try:
        async with aclosing(_merged(streams)) as events:
            async for p, event in events:
                if isinstance(event, DeltaEvent):
                    timer.delta(event)
                    for data in writer.delta(p, event):
                        yield data
                elif isinstance(event, FinishEvent):
                    tally.add(event)
                    for data in writer.finish(p, event):
                        yield data
                elif isinstance(event, ErrorEvent):
                    yield sse_safe(generation_failed(event.message).json())
                    yield "[DONE]"  # clients that wait for it stop here too
                    return
        runtime.metrics.count_tokens(tally.prompt, tally.completion, tally.cached)
        if writer.include_usage:
            yield writer.usage(tally)
        yield "[DONE]"
    finally:
        for request_id in request_ids:  # a no-op when finished; frees the slots on disconnect
            runtime.engine.abort(request_id)


def sse_response(
    runtime: Runtime, chunks: AsyncIterator[str], http: Request | None = None
) -> EventSourceResponse:
    """Stream ``chunks`` as server-sent events, with keepalive comments while a stream waits.

    The ``: keepalive`` comment lines (every ``sse_keepalive_seconds``) keep proxies from
    timing out during a long prefill; OpenAI clients ignore them. When the server drains for
    shutdown and its deadline passes, the stream ends with an error event and ``[DONE]``
    (``server/http/drain.py``).

    Args:
        runtime: The runtime (its settings give the interval).
        chunks: The ``data:`` payloads.
        http: The HTTP request (its app's drain); None: no shutdown deadline.

    Returns:
        The streaming response.
    """
    drain = drain_of(http.app) if http is not None else None
    return EventSourceResponse(
        drain.guard(chunks) if drain is not None else chunks,
        ping=runtime.settings.sse_keepalive_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment="keepalive"),
    )


async def collect(
    runtime: Runtime, events: AsyncIterator[Event], request_id: str, http: Request
) -> list[Event]:
    """Gather every event of a non-streaming request, aborting if the client leaves.

    Args:
        runtime: The runtime.
        events: From ``submit``.
        request_id: To abort on disconnect.
        http: The HTTP request.

    Returns:
        All events, in order.

    Raises:
        APIError: 503 ``shutting_down`` when the server's shutdown drain deadline passes.
    """
    timer = TokenTimer(runtime)
    out: list[Event] = []

    async def consume() -> None:
        async for event in events:
            if isinstance(event, DeltaEvent):
                timer.delta(event)
            out.append(event)

    drain = drain_of(http.app)
    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SECONDS)
            if not task.done() and drain is not None and drain.cut:
                task.cancel()
                raise shutting_down()  # the shutdown's drain deadline passed
            if not task.done() and await http.is_disconnected():
                task.cancel()
                break
        await task
    except asyncio.CancelledError:
        pass
    finally:
        runtime.engine.abort(request_id)  # harmless once finished; stops work if not
    return out


@dataclass
class ChoiceOutput:
    """What one choice generated, for a non-streaming answer."""

    finish: FinishEvent
    deltas: list[DeltaEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The choice's text (cut at stop strings)."""
        return "".join(d.text for d in self.deltas)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """Its tokens' log-probabilities, when the request asked for them."""
        return [lp for d in self.deltas for lp in d.logprobs or []]


async def collect_choices(
    runtime: Runtime,
    streams: list[AsyncIterator[Event]],
    request_ids: list[str],
    http: Request,
    n: int,
    tally: Tally,
) -> list[ChoiceOutput]:
    """Every choice of a non-streaming request, in OpenAI's order (``p * n + i``).

    Args:
        runtime: The runtime.
        streams: One event stream per prompt, from ``submit``.
        request_ids: Their engine request ids.
        http: The HTTP request (to notice a client that leaves).
        n: Choices per prompt.
        tally: The request's prompt tokens; the rest is counted here.

    Returns:
        The choices.

    Raises:
        APIError: 500 ``generation_failed``; 499 when the client left before the end.
    """
    per_prompt = await asyncio.gather(
        *[collect(runtime, s, rid, http) for s, rid in zip(streams, request_ids)]
    )
    choices: list[ChoiceOutput] = []
    for events in per_prompt:
        deltas: dict[int, list[DeltaEvent]] = {i: [] for i in range(n)}
        finishes: dict[int, FinishEvent] = {}
        for event in events:
            if isinstance(event, ErrorEvent):
                raise generation_failed(event.message)
            if isinstance(event, DeltaEvent):
                deltas[event.index].append(event)
            else:
                finishes[event.index] = event
        if len(finishes) != n:
            raise APIError(499, "client closed the request", code="client_closed_request")
        for i in range(n):
            tally.add(finishes[i])
            choices.append(ChoiceOutput(finishes[i], deltas[i]))
    runtime.metrics.count_tokens(tally.prompt, tally.completion, tally.cached)
    return choices
