"""The Anthropic Messages API's answers: content blocks, stop reasons and error envelopes.

Chat deltas become content blocks and stream events (anthropic/content.py); the engine's
finish becomes a stop reason; the request's path decides the error envelope
(anthropic/errors.py through errors.py and the API-key middleware).
"""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from moeserve.server.http.anthropic.content import (
    ContentBuilder,
    matched_stop,
    stop_reason,
    tool_input,
)
from moeserve.server.http.anthropic.errors import error_type, speaks_anthropic
from moeserve.server.http.app import APIKeyMiddleware
from moeserve.server.http.errors import APIError, install_handlers
from moeserve.server.http.responses import Delta, FunctionDelta, ToolCallDelta


def call_start(index: int, call_id: str, name: str) -> Delta:
    function = FunctionDelta(name=name, arguments="")
    return Delta(
        tool_calls=[ToolCallDelta(index=index, id=call_id, type="function", function=function)]
    )


def call_args(index: int, text: str) -> Delta:
    return Delta(tool_calls=[ToolCallDelta(index=index, function=FunctionDelta(arguments=text))])


def test_deltas_become_thinking_text_and_tool_use_blocks_with_their_events() -> None:
    builder = ContentBuilder()
    deltas = [
        Delta(reasoning_content="Think"),
        Delta(reasoning_content="ing."),
        Delta(content="Hello"),
        Delta(content=""),  # nothing to say: no event, no block
        Delta(content=" there."),
        call_start(0, "call_a", "get_weather"),
        call_args(0, '{"city": '),
        call_args(0, '"Paris"}'),
        call_start(1, "call_b", "get_time"),
        call_args(1, "{}"),
    ]
    events = [e for d in deltas for e in builder.add(d)] + builder.close()
    blocks = [b.model_dump() for b in builder.blocks]
    assert blocks == [
        {"type": "thinking", "thinking": "Thinking.", "signature": ""},
        {"type": "text", "text": "Hello there."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}},
    ]
    kinds = [(e.type, getattr(e, "index", None)) for e in events]
    assert kinds == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("content_block_start", 3),
        ("content_block_delta", 3),
        ("content_block_stop", 3),
    ]
    # Each start event carries its block empty, as Anthropic's do, whatever came after.
    assert events[0].content_block.model_dump() == {
        "type": "thinking",
        "thinking": "",
        "signature": "",
    }
    assert events[8].content_block.model_dump() == {
        "type": "tool_use",
        "id": "call_a",
        "name": "get_weather",
        "input": {},
    }
    pieces = [e.delta.partial_json for e in events[9:11]]
    assert "".join(pieces) == '{"city": "Paris"}'


def test_nothing_generated_is_no_block() -> None:
    builder = ContentBuilder()
    assert builder.add(Delta(content="")) == [] and builder.close() == []
    assert builder.blocks == []


def test_tool_input_is_an_object_or_empty() -> None:
    assert tool_input('{"a": [1]}') == {"a": [1]}
    assert tool_input("") == {} and tool_input("[1]") == {} and tool_input('{"a":') == {}


def test_stop_reasons() -> None:
    assert stop_reason("stop", False, None) == "end_turn"
    assert stop_reason("stop", True, None) == "tool_use"
    assert stop_reason("stop", False, "END") == "stop_sequence"
    assert stop_reason("length", False, None) == "max_tokens"
    assert stop_reason("length", True, None) == "max_tokens"  # cut, even after complete calls


def test_the_stop_sequence_is_found_in_the_choices_decoded_tokens() -> None:
    tokenizer = SimpleNamespace(decode=lambda ids: "".join(chr(i) for i in ids))
    ids = [ord(c) for c in "one two END"]
    assert matched_stop(tokenizer, ids, ["END", "two"]) == "two"  # the first one the text meets
    assert matched_stop(tokenizer, ids, ["NONE"]) is None
    assert matched_stop(tokenizer, ids, []) is None


def test_error_types_follow_anthropics_statuses() -> None:
    assert [error_type(s) for s in (400, 401, 403, 404, 413, 429, 500, 503)] == [
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "overloaded_error",
    ]
    assert error_type(405) == "invalid_request_error" and error_type(502) == "api_error"
    assert speaks_anthropic("/v1/messages") and speaks_anthropic("/v1/messages/count_tokens")
    assert not speaks_anthropic("/v1/messagesX") and not speaks_anthropic("/v1/chat/completions")


class Body(BaseModel):
    """A request body with a required field."""

    max_tokens: int


def app_with_routes(keys: frozenset[str] = frozenset()) -> FastAPI:
    app = FastAPI()
    install_handlers(app)

    for path in ("/v1/messages", "/v1/chat/completions"):

        @app.post(path)
        async def route(body: Body) -> dict[str, int]:
            if body.max_tokens > 10:
                raise APIError(429, "the queue is full", type="rate_limit_error", code="x")
            return {"ok": 1}

    if keys:
        app.add_middleware(APIKeyMiddleware, keys=keys)
    return app


def test_the_path_decides_the_error_envelope() -> None:
    with TestClient(app_with_routes()) as client:
        missing = client.post("/v1/messages", json={})
        assert missing.status_code == 400
        assert missing.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
        }
        busy = client.post("/v1/messages", json={"max_tokens": 11})
        assert busy.status_code == 429
        assert busy.json()["error"] == {"type": "rate_limit_error", "message": "the queue is full"}
        unknown = client.get("/v1/messages/nothing")
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
        openai = client.post("/v1/chat/completions", json={})
        assert openai.json()["error"]["param"] == "max_tokens"  # OpenAI's envelope there


def test_x_api_key_is_accepted_and_a_bad_key_is_an_anthropic_401_on_messages() -> None:
    with TestClient(app_with_routes(frozenset({"sk-good"}))) as client:
        body = {"max_tokens": 1}
        ok = client.post("/v1/messages", json=body, headers={"x-api-key": "sk-good"})
        assert ok.status_code == 200
        bad = client.post("/v1/messages", json=body, headers={"x-api-key": "sk-bad"})
        assert bad.status_code == 401
        assert bad.json()["error"]["type"] == "authentication_error"
        openai = client.post("/v1/chat/completions", json=body)
        assert openai.status_code == 401 and openai.json()["error"]["code"] == "invalid_api_key"
