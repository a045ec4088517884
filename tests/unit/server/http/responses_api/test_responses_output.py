"""Generated text as output items and stream events (responses_api/output.py, stream.py)."""

from __future__ import annotations

import json

from moeserve.server.http.responses_api.objects import ResponseObject
from moeserve.server.http.responses_api.output import OutputBuilder, finished, usage
from moeserve.server.http.responses_api.stream import EventWriter
from moeserve.server.http.routes.chat_output import OutputConfig
from moeserve.server.http.routes.generation import Tally

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
THINK = OutputConfig(reasoning=("think", True))  # the prompt opened <think>
TOOLS = OutputConfig(tool_format="qwen", tools=[WEATHER])


def build(config: OutputConfig, text: str, reason: str = "stop", pieces: int = 5):
    builder = OutputBuilder(config)
    step = max(1, len(text) // pieces)
    events = [e for i in range(0, len(text), step) for e in builder.feed(text[i : i + step], 1)]
    events += builder.finish(reason)
    return builder, events


def kinds(events) -> list[str]:
    return [e.type for e in events]


def test_plain_text_is_one_message() -> None:
    builder, events = build(OutputConfig(), "Hello there, friend.")
    [item] = builder.items
    assert item.type == "message" and item.status == "completed" and item.id.startswith("msg_")
    assert item.content[0].text == "Hello there, friend."
    assert kinds(events)[:2] == ["response.output_item.added", "response.content_part.added"]
    assert kinds(events)[-3:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "Hello there, friend."
    added = events[0].item
    assert added.status == "in_progress" and added.content == [] and added.id == item.id
    assert {e.output_index for e in events} == {0}


def test_reasoning_then_message_are_two_items() -> None:
    builder, events = build(THINK, "Let me think.</think>The answer.")
    reasoning, message = builder.items
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert reasoning.content[0].text == "Let me think." and reasoning.summary == []
    assert message.content[0].text.strip() == "The answer."
    assert "response.reasoning_text.delta" in kinds(events)
    done = [e for e in events if e.type == "response.reasoning_text.done"]
    assert [e.text for e in done] == ["Let me think."]
    # The reasoning item closes (index 0) before the message opens (index 1).
    order = [(e.type, e.output_index) for e in events if e.type.startswith("response.output_item")]
    assert order == [
        ("response.output_item.added", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.output_item.done", 1),
    ]
    assert builder.reasoning_tokens > 0


def test_tool_calls_are_function_call_items() -> None:
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    builder, events = build(TOOLS, text, pieces=9)
    calls = [i for i in builder.items if i.type == "function_call"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert all(c.name == "get_weather" and c.status == "completed" for c in calls)
    assert calls[0].call_id != calls[1].call_id and calls[0].id.startswith("fc_")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [c.arguments for c in calls]
    for call in calls:
        pieces = [
            e.delta
            for e in events
            if e.type == "response.function_call_arguments.delta" and e.item_id == call.id
        ]
        assert "".join(pieces) == call.arguments
    assert not any(i.type == "message" for i in builder.items)  # no empty message beside calls


def test_a_single_call_when_parallel_calls_are_off() -> None:
    config = OutputConfig(tool_format="qwen", tools=[WEATHER], single_call=True)
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    )
    builder, _ = build(config, text)
    assert [i.type for i in builder.items if i.type != "message"] == ["function_call"]


def test_no_text_is_an_empty_message() -> None:
    builder, events = build(OutputConfig(), "")
    [item] = builder.items
    assert item.type == "message" and item.content[0].text == ""
    assert kinds(events) == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]


def test_a_cut_marks_the_last_item_incomplete() -> None:
    builder, _ = build(THINK, "Thinking</think>Partial answ", reason="length")
    assert [i.status for i in builder.items] == ["completed", "incomplete"]
    base = ResponseObject(id="resp_1", created_at=0, status="in_progress", model="m")
    final = finished(base, builder, "length", usage(Tally(prompt=5, completion=9), 3, False))
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    done = finished(base, builder, "stop", usage(Tally(prompt=5, completion=9), 3, False))
    assert done.status == "completed" and done.incomplete_details is None
    assert base.status == "in_progress" and base.output == []  # the base is not changed


def test_usage_counts() -> None:
    used = usage(Tally(prompt=10, completion=4, cached=6), 2, caches=True)
    assert used.input_tokens == 10 and used.output_tokens == 4 and used.total_tokens == 14
    assert used.input_tokens_details.cached_tokens == 6
    assert used.input_tokens_details.cache_write_tokens == 4
    assert used.output_tokens_details.reasoning_tokens == 2
    assert usage(Tally(prompt=10), 0, caches=False).input_tokens_details.cache_write_tokens == 0


def test_the_writer_numbers_and_frames_events() -> None:
    _, events = build(OutputConfig(), "Hi")
    writer = EventWriter()
    framed = [writer.write(e) for e in events]
    for n, (event, sse) in enumerate(zip(events, framed)):
        data = json.loads(sse.data)
        assert sse.event == data["type"] == event.type
        assert data["sequence_number"] == n
    assert b"event: response.output_item.added\r\ndata: {" in framed[0].encode()
