"""The ``anthropic`` package against a live moeserve's Messages API (``/v1/messages``).

Clients are built as users build them, ``Anthropic(base_url=server.url, api_key=...)``, with
``max_retries=0`` so that the first error the server sends is the one raised. The server has
an API key, which the SDK sends as ``x-api-key``. Greedy text is checked against the same
conversation sent to ``/v1/chat/completions`` with plain httpx (the Messages API translates
into the chat pipeline, so the two must agree), streamed against not streamed, and usage
against the server's own ``count_tokens``. The tiny model's weights are random: its text is
compared, never read, and only constrained output (a forced tool call) is judged for content.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from pydantic import BaseModel, Field

from tests.compat.conftest import API_KEY
from tests.live import LiveServer

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello there"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
# The SDK has no sampling arguments any more; the API (and moeserve) still takes them.
GREEDY = {"temperature": 0}
TOOLS = [{"name": "get_weather", "description": "The forecast", "input_schema": WEATHER_SCHEMA}]


class Weather(BaseModel):
    """What a ``get_weather`` input must be."""

    model_config = {"extra": "forbid"}
    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=14)


@pytest.fixture(scope="module")
def live(tiny_model: Path, tmp_path_factory) -> Iterator[LiveServer]:
    """A server with an API key and room for tool definitions (the tiny tokenizer is verbose)."""
    server = LiveServer.start(
        tiny_model,
        "--model-alias",
        "tiny",
        "--max-model-len",
        "4096",
        "--api-key",
        API_KEY,
        log_dir=tmp_path_factory.mktemp("anthropic"),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.url, api_key=API_KEY, max_retries=0)


def chat_text(live: LiveServer, messages: list[dict], max_tokens: int) -> str:
    """The same conversation, greedy, through ``/v1/chat/completions``."""
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(live.base_url + "/chat/completions", json=body, headers=headers, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_create_answers_a_message_with_usage(client, live):
    reply = client.messages.create(model="tiny", max_tokens=8, messages=HELLO, extra_body=GREEDY)
    assert reply.id.startswith("msg_") and reply.type == "message" and reply.role == "assistant"
    assert reply.model == "tiny" and reply.stop_reason == "max_tokens"
    [block] = reply.content
    assert block.type == "text" and block.text == chat_text(live, HELLO, 8)
    usage = reply.usage
    assert usage.output_tokens == 8 and usage.cache_creation_input_tokens == 0
    prompt = client.messages.count_tokens(model="tiny", messages=HELLO).input_tokens
    assert usage.input_tokens + usage.cache_read_input_tokens == prompt


def test_stream_deltas_assemble_to_the_same_text_in_anthropics_event_order(client, live):
    knobs = {"model": "tiny", "max_tokens": 8, "messages": HELLO, "extra_body": GREEDY}
    with client.messages.stream(**knobs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    text = "".join(e.text for e in events if e.type == "text")
    assert text and text == final.content[0].text == chat_text(live, HELLO, 8)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    raw = [e.type for e in client.messages.create(**knobs, stream=True)]
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}
    # On the wire: every event named, a ping right after message_start (the SDK skips it).
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    wire = {"model": "tiny", "max_tokens": 8, "messages": HELLO, "stream": True, **GREEDY}
    body = httpx.post(live.url + "/v1/messages", json=wire, headers=headers)
    names = re.findall(r"^event: (\w+)", body.text, re.MULTILINE)
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"
    assert len(names) == len(re.findall(r"^data: ", body.text, re.MULTILINE))


def test_a_stop_sequence_ends_the_message_and_is_named(client):
    knobs = {"model": "tiny", "max_tokens": 12, "messages": HELLO, "extra_body": GREEDY}
    text = client.messages.create(**knobs).content[0].text
    # A two-character piece of the greedy text, away from its start (and from any U+FFFD).
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    reply = client.messages.create(**knobs, stop_sequences=[stop])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == stop
    said = "".join(b.text for b in reply.content if b.type == "text")
    assert said == text[: text.index(stop)]  # up to the first place the stop appears
    with client.messages.stream(**knobs, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_a_forced_tool_streams_a_schema_valid_input(client):
    for _ in range(3):
        with client.messages.stream(
            model="tiny",
            max_tokens=200,
            tools=TOOLS,
            tool_choice={"type": "tool", "name": "get_weather"},
            messages=[{"role": "user", "content": "Weather in Paris?"}],
        ) as stream:
            final = stream.get_final_message()
        assert final.stop_reason == "tool_use"
        [call] = [b for b in final.content if b.type == "tool_use"]
        assert call.name == "get_weather" and call.id
        Weather.model_validate(call.input)


def test_a_tool_result_goes_back_and_the_second_turn_answers(client):
    first = client.messages.create(
        model="tiny",
        max_tokens=200,
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    [call] = [b for b in first.content if b.type == "tool_use"]
    Weather.model_validate(call.input)
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": first.content},  # the SDK's blocks, sent back as-is
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24C"}],
        },
    ]
    second = client.messages.create(
        model="tiny", max_tokens=6, tools=TOOLS, messages=conversation, extra_body=GREEDY
    )
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use") and second.content
    counted = client.messages.count_tokens(model="tiny", tools=TOOLS, messages=conversation)
    usage = second.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == counted.input_tokens
    alone = client.messages.count_tokens(model="tiny", tools=TOOLS, messages=conversation[:1])
    assert counted.input_tokens > alone.input_tokens  # the call and its result were rendered


def test_a_sessions_second_turn_reads_the_prompt_cache(client):
    session = {"user_id": f"session-{uuid.uuid4().hex}"}
    turn = [{"role": "user", "content": "Tell me a story about a " + uuid.uuid4().hex}]
    first = client.messages.create(model="tiny", max_tokens=4, messages=turn, metadata=session)
    turn += [
        {"role": "assistant", "content": first.content[0].text},
        {"role": "user", "content": "And then?"},
    ]
    second = client.messages.create(model="tiny", max_tokens=4, messages=turn, metadata=session)
    # At least the first turn's prompt is reused (all of it but the token prefill recomputes
    # to sample from); another session finds at most what every caller shares (the template).
    first_prompt = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= first_prompt - 1
    other = {"user_id": f"session-{uuid.uuid4().hex}"}
    stranger = client.messages.create(model="tiny", max_tokens=4, messages=turn, metadata=other)
    assert stranger.usage.cache_read_input_tokens < first_prompt - 1
    prompt = client.messages.count_tokens(model="tiny", messages=turn).input_tokens
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == prompt


def test_count_tokens_counts_the_rendered_prompt(client, live):
    counted = client.messages.count_tokens(model="tiny", system="Be brief.", messages=HELLO)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": [{"role": "system", "content": "Be brief."}, *HELLO]}
    r = httpx.post(live.url + "/tokenize", json=body, headers=headers, timeout=30)
    assert counted.input_tokens == r.json()["count"]


def test_errors_arrive_as_the_sdks_exceptions(client, live):
    with pytest.raises(anthropic.BadRequestError) as missing:
        # The SDK insists on max_tokens itself: send the body without it through its client.
        body = {"model": "tiny", "messages": HELLO}
        client.post("/v1/messages", body=body, cast_to=anthropic.types.Message)
    assert missing.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as image:
        source = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
        content = [{"type": "image", "source": source}]
        client.messages.create(
            model="tiny", max_tokens=4, messages=[{"role": "user", "content": content}]
        )
    assert "'image'" in image.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(model="claude-nope", max_tokens=4, messages=HELLO)
    assert unknown.value.body["error"]["type"] == "not_found_error"
    stranger = anthropic.Anthropic(base_url=live.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        stranger.messages.create(model="tiny", max_tokens=4, messages=HELLO)
    assert denied.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        stranger.messages.count_tokens(model="tiny", messages=HELLO)
