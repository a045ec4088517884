"""A streaming Anthropic message (anthropic/stream.py), from engine events to SSE events.

A fake runtime and a scripted event stream stand in for the engine: the events' names and
order, the final usage split, an engine failure as an ``error`` event, the shutdown drain's
farewell in Anthropic's words, and the engine request aborted however the stream ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from moeserve.server.engine.events import DeltaEvent, ErrorEvent, Event, FinishEvent
from moeserve.server.http.anthropic.protocol import MessagesRequest
from moeserve.server.http.anthropic.stream import drain_farewell, message_events
from moeserve.server.http.routes.chat import Started
from moeserve.server.http.routes.chat_output import OutputConfig
from moeserve.server.http.routes.generation import Tally


class Recorder:
    """Whatever a metric or the engine is asked to do, remembered."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def observe(self, _: float) -> None:
        pass

    def count_tokens(self, *_: int) -> None:
        pass

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)


def setup(events: list[Event], **fields: Any) -> tuple[Any, MessagesRequest, Started, Recorder]:
    recorder = Recorder()
    metrics = SimpleNamespace(ttft=recorder, itl=recorder, count_tokens=recorder.count_tokens)
    tokenizer = SimpleNamespace(decode=lambda ids: "".join(chr(i) for i in ids))
    runtime = SimpleNamespace(metrics=metrics, engine=recorder, tokenizer=tokenizer)
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    req = MessagesRequest.model_validate({**body, **fields, "stream": True})

    async def stream() -> AsyncIterator[Event]:
        for event in events:
            yield event

    started = Started("msg-abc", [1, 2, 3, 4], OutputConfig(), [stream()], Tally(prompt=4))
    return runtime, req, started, recorder


def run(events: list[Event], **fields: Any) -> tuple[list[tuple[str, dict]], Recorder]:
    runtime, req, started, recorder = setup(events, **fields)

    async def collect() -> list[tuple[str, dict]]:
        return [(e.event, json.loads(e.data)) async for e in message_events(runtime, req, started)]

    return asyncio.run(collect()), recorder


def delta(text: str) -> DeltaEvent:
    return DeltaEvent(0, text, [ord(c) for c in text])


def test_a_stream_is_anthropics_event_sequence_with_the_usage_split_at_the_end() -> None:
    finish = FinishEvent(0, "length", 4, 2, cached_tokens=3)
    events, recorder = run([delta("Hel"), delta("lo"), finish])
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in events)
    start = events[0][1]["message"]
    assert start["id"] == "msg_abc" and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 4  # the whole prompt: reuse is not known yet
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "Hello"
    end = events[-2][1]
    assert end["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert end["usage"] == {
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 3,
    }
    assert recorder.aborted == ["msg-abc"]


def test_the_stop_sequence_is_named_in_message_delta() -> None:
    # The engine cut "ab|STOP" before the stop string; its tokens still hold it.
    cut = DeltaEvent(0, "ab", [ord(c) for c in "abSTOP"])
    events, _ = run([cut, FinishEvent(0, "stop", 4, 6, 0)], stop_sequences=["STOP"])
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}
    events, _ = run([delta("ab"), FinishEvent(0, "stop", 4, 2, 0)], stop_sequences=["STOP"])
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_a_failed_generation_ends_with_an_error_event() -> None:
    events, recorder = run([delta("Hel"), ErrorEvent("the model failed")])
    name, data = events[-1]
    assert name == "error"
    assert data == {"type": "error", "error": {"type": "api_error", "message": "the model failed"}}
    assert recorder.aborted == ["msg-abc"]


def test_a_client_that_leaves_aborts_the_engine_request() -> None:
    runtime, req, started, recorder = setup([delta("Hel"), delta("lo")])

    async def leave_early() -> None:
        events = message_events(runtime, req, started)
        await anext(events)  # message_start, then the client is gone
        await events.aclose()

    asyncio.run(leave_early())
    assert recorder.aborted == ["msg-abc"]


def test_the_drains_farewell_becomes_an_anthropic_error_event() -> None:
    async def relayed() -> AsyncIterator[Any]:
        yield SimpleNamespace(event="ping")  # an event of ours passes through untouched
        yield '{"error": {"message": "the server is shutting down"}}'
        yield "[DONE]"

    async def collect() -> list[Any]:
        return [e async for e in drain_farewell(relayed())]

    ping, error = asyncio.run(collect())
    assert ping.event == "ping" and error.event == "error"
    assert json.loads(error.data)["error"]["type"] == "overloaded_error"
