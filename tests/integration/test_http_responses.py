"""``/v1/responses`` over raw HTTP: SSE framing, errors named in its own fields, failures.

The ``openai`` package's view is ``tests/compat/test_openai_responses.py``; here the bytes:
each event is an ``event:`` line naming its type and one ``data:`` line repeating it, and
errors from the shared chat pipeline name the Responses API's fields (``input``,
``max_output_tokens``, ``text.format``). A model that fails mid-stream (the engine-failure
tests' wrapped model) ends the stream with ``response.failed``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from moeserve.server.settings import load_settings

# The engine-failure tests' factory: the real tiny model, raising from its N-th forward pass.
from tests.integration.test_http_engine_failure import _factory

RESPONSES = "/v1/responses"
TOOL = {
    "type": "function",
    "name": "f",
    "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
}


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split a Responses SSE body into (event name, data) pairs, checking the framing."""
    text = re.sub(r"\r\n|\r", "\n", raw.decode("utf-8"))
    assert text.endswith("\n\n")
    out = []
    for block in text[:-2].split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue  # a keepalive comment
        assert len(lines) == 2 and lines[0].startswith("event: "), block
        assert lines[1].startswith("data: "), block
        out.append((lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])))
    return out


def stream(client: httpx.Client, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    with client.stream("POST", RESPONSES, json={"model": "tiny", "stream": True, **body}) as r:
        raw = r.read()
        assert r.status_code == 200, raw
        assert r.headers["content-type"].startswith("text/event-stream")
    return events(raw)


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_each_event_names_its_type_and_counts(client):
    out = stream(client, {"input": "Hello", "max_output_tokens": 5, "temperature": 0})
    assert [name for name, _ in out] == [data["type"] for _, data in out]
    assert [data["sequence_number"] for _, data in out] == list(range(len(out)))
    assert out[0][0] == "response.created" and out[-1][0] == "response.incomplete"
    assert out[-1][1]["response"]["usage"]["output_tokens"] == 5
    assert "[DONE]" not in json.dumps(out)


def test_a_prompt_too_long_names_input(client):
    r = client.post(RESPONSES, json={"model": "tiny", "input": "word " * 2000})
    e = error(r, 400)
    assert e["param"] == "input" and e["code"] == "context_length_exceeded"
    assert "input" in e["message"] and "messages" not in e["message"]


def test_a_limit_over_the_context_is_the_context_error(client):
    # As chat's: OpenAI's context_length_exceeded names the prompt, here ``input``.
    r = client.post(RESPONSES, json={"model": "tiny", "input": "Hi", "max_output_tokens": 10**6})
    e = error(r, 400)
    assert e["param"] == "input" and e["code"] == "context_length_exceeded"
    assert "1000000" in e["message"] and "messages" not in e["message"]


def test_format_errors_name_text_format(client):
    bad_schema = {"type": "json_schema", "name": "x", "schema": {"$ref": "#"}}
    r = client.post(RESPONSES, json={"model": "tiny", "input": "x", "text": {"format": bad_schema}})
    e = error(r, 400)
    assert e["param"] == "text.format" and e["code"] == "invalid_schema"
    both = {
        "model": "tiny",
        "input": "x",
        "tools": [TOOL],
        "tool_choice": "required",
        "text": {"format": {"type": "json_object"}},
    }
    e = error(client.post(RESPONSES, json=both), 400)
    assert e["param"] == "text.format" and "response_format" not in e["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "input[0]"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
        ({"input": "x", "tools": [{"type": "file_search"}]}, "tools[0].type"),
        ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": "x", "temperature": "1"}, "temperature"),
        ({"input": 7}, "input"),
        ({"input": "x", "store": "yes"}, "store"),
        ({"input": "x", "prompt_cache_key": "a\nb"}, "prompt_cache_key"),
        ({}, "input"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(client, body, param):
    assert error(client.post(RESPONSES, json={"model": "tiny", **body}), 400)["param"] == param


def test_unknown_ids_are_404(client):
    for method in ("GET", "DELETE"):
        e = error(client.request(method, RESPONSES + "/resp_unknown"), 404)
        assert e["code"] == "not_found" and "resp_unknown" in e["message"]


def test_openapi_documents_the_routes(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"][RESPONSES]["post"]["responses"]
    assert "text/event-stream" in post["200"]["content"]
    for status in ("400", "404", "429"):
        assert post[status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
    assert set(spec["paths"][RESPONSES + "/{response_id}"]) == {"get", "delete"}


# ----- a model that fails mid-generation ------------------------------------------------------


@pytest.fixture(scope="module")
def failing(inprocess_server, tiny_model):
    """``failing(fail_at)``: a client of a fresh app whose model fails at that forward pass."""
    settings = load_settings(
        model=str(tiny_model), model_aliases=["tiny"], max_model_len=512, prompt_cache=False
    )
    clients = []

    def start(fail_at: int) -> httpx.Client:
        live = inprocess_server(settings, _factory(fail_at))
        clients.append(httpx.Client(base_url=live.url, timeout=30))
        return clients[-1]

    yield start
    for c in clients:
        c.close()


def test_a_failure_mid_stream_ends_with_response_failed(failing):
    client = failing(6)  # prefill + 4 decodes succeed, then the fault
    # Greedy: the fault, not an early end of the answer, must be what stops it.
    out = stream(client, {"input": "hello", "max_output_tokens": 50, "temperature": 0})
    names = [name for name, _ in out]
    assert names[0] == "response.created" and names[-1] == "response.failed"
    assert "response.output_text.delta" in names
    response = out[-1][1]["response"]
    assert response["status"] == "failed" and response["error"]["code"] == "server_error"
    assert "simulated device fault" in response["error"]["message"]
    assert client.get(RESPONSES + "/" + response["id"]).status_code == 404  # not stored


def test_a_failure_without_streaming_is_a_500(failing):
    client = failing(3)
    body = {"model": "tiny", "input": "hello", "temperature": 0}
    e = error(client.post(RESPONSES, json=body), 500)
    assert e["code"] == "generation_failed" and "simulated device fault" in e["message"]
