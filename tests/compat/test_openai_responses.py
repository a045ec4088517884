"""The ``openai`` package's Responses API (``client.responses``) against a live moeserve.

``responses.create`` whole and streamed, ``responses.stream`` and ``responses.parse`` with a
pydantic model, function tools and their outputs, ``previous_response_id`` chains (with the
prompt cache carrying the conversation), ``GET`` / ``DELETE``, ``max_output_tokens`` cuts and
the errors, each parsed by the real SDK. The tiny model's weights are random: text is never
judged, only its shapes and counts; what must be well-formed (JSON, call arguments) is
constrained. Where a Responses request stands for a chat request, the chat answer (or the
server's ``/tokenize``) made with plain httpx is the reference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.live import LiveServer

pytestmark = pytest.mark.slow

GREEDY = {"model": "tiny", "temperature": 0}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The forecast for a city.",
    "parameters": WEATHER_PARAMETERS,
    "strict": True,
}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
LONG_TEXT = {  # a JSON object no 4 tokens can finish
    "type": "json_schema",
    "name": "essay",
    "schema": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 60, "maxLength": 80}},
        "required": ["text"],
        "additionalProperties": False,
    },
    "strict": True,
}


class City(BaseModel):
    """A structured answer (the SDK sends it as a strict JSON schema)."""

    name: str = Field(max_length=16)
    population: int = Field(ge=0, le=50_000_000)


class Forecast(BaseModel):
    """``get_weather``'s arguments."""

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=14)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory) -> Iterator[LiveServer]:
    """A server with room for tool definitions (the tiny tokenizer is verbose)."""
    live = LiveServer.start(
        tiny_model,
        "--model-alias",
        "tiny",
        "--max-model-len",
        "4096",
        log_dir=tmp_path_factory.mktemp("responses"),
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="sk-unused", max_retries=0)


def tokenize(server: LiveServer, **body: Any) -> int:
    """Prompt tokens of a chat conversation as the server renders it (``/tokenize``)."""
    r = httpx.post(server.url + "/tokenize", json=body, timeout=30)
    r.raise_for_status()
    return r.json()["count"]


def message_text(response: Any) -> str:
    [message] = [item for item in response.output if item.type == "message"]
    [part] = message.content
    assert part.type == "output_text" and part.annotations == []
    return part.text


def test_create_answers_as_the_same_chat_request(client, server, reference_chat):
    r = client.responses.create(input="Hello!", max_output_tokens=16, **GREEDY)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.status in ("completed", "incomplete")
    chat = reference_chat([{"role": "user", "content": "Hello!"}], 16)
    assert r.output_text == message_text(r) == chat["choices"][0]["message"]["content"]
    usage = r.usage
    assert usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert usage.output_tokens == chat["usage"]["completion_tokens"] <= 16
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert 0 <= usage.input_tokens_details.cached_tokens <= usage.input_tokens
    assert r.max_output_tokens == 16 and r.temperature == 0 and r.store is True
    assert r.tools == [] and r.tool_choice == "auto" and r.text.format.type == "text"


def test_instructions_are_the_system_message(client, server):
    r = client.responses.create(
        instructions="Answer briefly.", input="Hi", max_output_tokens=4, **GREEDY
    )
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]
    assert r.usage.input_tokens == tokenize(server, messages=messages)
    assert r.instructions == "Answer briefly."


def test_stream_events_assemble_the_same_text(client):
    knobs = {"input": "Tell me a story.", "max_output_tokens": 12, **GREEDY}
    whole = client.responses.create(**knobs)
    events = list(client.responses.create(stream=True, **knobs))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.id == events[0].response.id != whole.id


def test_stream_helper_parses_the_final_response(client):
    with client.responses.stream(
        input="A big city?", text_format=City, max_output_tokens=200, **GREEDY
    ) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_response()
    assert "response.output_text.delta" in kinds and "response.completed" in kinds
    assert final.status == "completed"
    assert isinstance(final.output_parsed, City)


def test_parse_returns_the_pydantic_model(client):
    for seed in range(3):
        r = client.responses.parse(
            model="tiny",
            input="Name a big city.",
            text_format=City,
            temperature=1.0,
            max_output_tokens=200,
            extra_body={"seed": seed},
        )
        assert r.status == "completed"
        assert isinstance(r.output_parsed, City)
        assert r.output_parsed == City.model_validate_json(r.output_text)
        assert r.text.format.type == "json_schema" and r.text.format.strict is True


def test_json_object_format(client):
    r = client.responses.create(
        input="Some JSON?", text={"format": {"type": "json_object"}}, max_output_tokens=64, **GREEDY
    )
    if r.status == "completed":  # an object may be longer than 64 tokens: then it is cut
        assert isinstance(json.loads(r.output_text), dict)


def test_required_function_call_then_its_output(client, server):
    question = {"role": "user", "content": "Weather in Paris?"}
    r = client.responses.create(
        input=[question], tools=[WEATHER], tool_choice="required", max_output_tokens=200, **GREEDY
    )
    assert r.status == "completed"
    [call] = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id
    Forecast.model_validate_json(call.arguments)  # schema-valid, as constrained
    assert r.tool_choice == "required" and r.tools[0].name == "get_weather"

    answer = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}
    follow = client.responses.create(
        input=[question, *r.output, answer], tools=[WEATHER], max_output_tokens=8, **GREEDY
    )
    assert follow.status in ("completed", "incomplete")
    chat_call = {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    messages = [
        question,
        {"role": "assistant", "content": None, "tool_calls": [chat_call]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'},
    ]
    assert follow.usage.input_tokens == tokenize(server, messages=messages, tools=[CHAT_WEATHER])

    # The same turn by reference: the stored conversation replaces the repeated input.
    chained = client.responses.create(
        previous_response_id=r.id,
        input=[answer],
        tools=[WEATHER],
        max_output_tokens=8,
        **GREEDY,
    )
    assert chained.usage.input_tokens == follow.usage.input_tokens
    assert chained.output_text == follow.output_text


def test_named_function_streams_its_arguments(client):
    knobs = {
        "input": "Weather in Oslo?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 200,
        **GREEDY,
    }
    whole = client.responses.create(**knobs)
    with client.responses.stream(**knobs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    calls = [item for item in final.output if item.type == "function_call"]
    expected = [item for item in whole.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected]
    assert len(calls) == 1
    Forecast.model_validate_json(calls[0].arguments)


def test_previous_response_id_continues_and_reuses_the_cache(client, server):
    first = client.responses.create(input="My name is Ada.", max_output_tokens=8, **GREEDY)
    second = client.responses.create(
        previous_response_id=first.id, input="What is my name?", max_output_tokens=8, **GREEDY
    )
    assert second.previous_response_id == first.id
    messages = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.usage.input_tokens == tokenize(server, messages=messages)
    cached = second.usage.input_tokens_details.cached_tokens
    assert first.usage.input_tokens <= cached < second.usage.input_tokens
    # A third turn continues the chain through the second.
    third = client.responses.create(
        previous_response_id=second.id, input="And again?", max_output_tokens=4, **GREEDY
    )
    assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens


def test_get_and_delete(client):
    created = client.responses.create(input="Remember me.", max_output_tokens=4, **GREEDY)
    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    deleted = client.responses.delete(created.id)  # the SDK returns None for the body
    assert deleted is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_delete_answers_the_documented_body(server, client):
    created = client.responses.create(input="x", max_output_tokens=2, **GREEDY)
    r = httpx.delete(f"{server.base_url}/responses/{created.id}", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"id": created.id, "object": "response.deleted", "deleted": True}


def test_store_false_is_not_kept(client):
    r = client.responses.create(input="Forget me.", max_output_tokens=2, store=False, **GREEDY)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_max_output_tokens_makes_it_incomplete(client):
    knobs = {"input": "Write.", "text": {"format": LONG_TEXT}, "max_output_tokens": 4, **GREEDY}
    r = client.responses.create(**knobs)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 4
    assert [item.status for item in r.output] == ["incomplete"]
    events = list(client.responses.create(stream=True, **knobs))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == r.output_text
    assert client.responses.retrieve(r.id).status == "incomplete"


def test_unknown_previous_response_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(input="Hi", previous_response_id="resp_nope", model="tiny")
    assert info.value.body["param"] == "previous_response_id"


def test_unsupported_tools_and_inputs_are_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input="Hi", tools=[{"type": "web_search"}], model="tiny")
    assert info.value.body["param"] == "tools[0].type"
    assert "not supported" in info.value.body["message"]
    image = {"type": "input_image", "image_url": "https://example.com/a.png"}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input=[{"role": "user", "content": [image]}], model="tiny")
    assert info.value.body["param"] == "input[0]"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="Hi", model="no-such-model")


def test_a_response_is_only_its_tenants(tiny_model: Path, tmp_path_factory):
    live = LiveServer.start(
        tiny_model,
        "--api-key",
        "sk-alice",
        "--api-key",
        "sk-bob",
        log_dir=tmp_path_factory.mktemp("responses-tenants"),
    )
    try:
        alice, bob = (
            openai.OpenAI(base_url=live.base_url, api_key=key, max_retries=0)
            for key in ("sk-alice", "sk-bob")
        )
        model = alice.models.list().data[0].id
        r = alice.responses.create(model=model, input="Secret.", max_output_tokens=2)
        assert alice.responses.retrieve(r.id).id == r.id
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(model=model, previous_response_id=r.id, input="Tell me.")
        with pytest.raises(openai.NotFoundError):
            bob.responses.delete(r.id)
        assert alice.responses.retrieve(r.id).id == r.id  # bob's delete did not touch it
    finally:
        live.stop()
