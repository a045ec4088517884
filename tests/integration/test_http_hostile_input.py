r"""Input a careless or hostile client sends: a 4xx in OpenAI's envelope, never a 500.

Each case here once answered 500 (and uvicorn then reset the keep-alive connection), or was
accepted where OpenAI refuses it. Bodies are sent as raw bytes: JSON's ``\\ud800`` escape is
how a lone surrogate arrives, and no JSON encoder of a client library writes one on purpose.
Every test also checks that the same connection still serves the next request.
"""

from __future__ import annotations

import json

import httpx
import pytest

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
SURROGATE = "\\ud800"  # the six characters of the JSON escape, not a Python surrogate


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


def _raw(client: httpx.Client, path: str, text: str) -> httpx.Response:
    return client.post(path, content=text.encode(), headers=JSON)


def _still_serves(client: httpx.Client) -> None:
    r = client.post(
        CHAT,
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            CHAT,
            '{"model": "tiny", "messages": [{"role": "user", "content": "a%sb"}]}',
            "messages[0].content",
        ),
        (
            CHAT,
            '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
            '"text": "%s"}]}]}',
            "messages[0].content[0].text",
        ),
        ("/v1/completions", '{"model": "tiny", "prompt": "x%s"}', "prompt"),
        ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "%s"]}', "prompt[1]"),
        ("/tokenize", '{"prompt": "%s"}', "prompt"),
        (CHAT, '{"model": "%s", "messages": [{"role": "user", "content": "x"}]}', "model"),
        (
            CHAT,
            '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            '"stop": ["%s"], "stream": true}',
            "stop[0]",
        ),
        (
            CHAT,
            '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            '"chat_template_kwargs": {"%s": 1}}',
            "chat_template_kwargs",
        ),
    ],
)
def test_lone_surrogates_are_refused_with_the_field_named(client, path, body, param):
    error = _error(_raw(client, path, body % SURROGATE))
    assert error["param"] == param
    assert "surrogate" in error["message"]
    _still_serves(client)


def test_valid_surrogate_pairs_still_work(client):
    # "\ud83d\ude00" is one emoji written as a JSON surrogate pair: valid Unicode.
    body = '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], '
    r = _raw(client, CHAT, body + '"max_tokens": 2}')
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("key", ["²", "--1", "1.5", " 1", "٣"])
def test_logit_bias_keys_must_be_ascii_token_ids(client, key):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    r = client.post(CHAT, json={**body, "logit_bias": {key: 1}})
    error = _error(r)
    assert error["param"] == "logit_bias"
    assert "token ids" in error["message"]
    _still_serves(client)


@pytest.mark.parametrize("key", ["tools", "messages", "add_generation_prompt"])
@pytest.mark.parametrize("path", [CHAT, "/tokenize"])
def test_chat_template_kwargs_cannot_set_what_the_server_sets(client, key, path):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    r = client.post(path, json={**body, "chat_template_kwargs": {key: []}})
    error = _error(r)
    assert error["param"] == "chat_template_kwargs"
    assert key in error["message"]
    _still_serves(client)


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_that_can_never_be_satisfied_is_a_400_before_any_stream(client, stream):
    schema = {"$ref": "#"}  # a value that is itself, forever: llguidance fails at its first mask
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "stream": stream,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    r = client.post(CHAT, json=body)
    error = _error(r)
    assert error["param"] == "response_format"
    assert error["code"] == "invalid_schema"
    _still_serves(client)


@pytest.mark.parametrize(
    "parameters", [{"$ref": "#"}, {"type": 5}, {"type": "integer", "minimum": 3, "maximum": 1}]
)
@pytest.mark.parametrize("tool_choice", ["auto", "none", None])
def test_tool_parameters_are_validated_whatever_the_tool_choice(client, parameters, tool_choice):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}],
        "max_tokens": 2,
    }
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    error = _error(client.post(CHAT, json=body))
    assert error["param"] == "tools"
    assert "'f'" in error["message"]


def test_a_tool_result_needs_the_id_of_its_call(client):
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "sunny"},
    ]
    error = _error(client.post(CHAT, json={"model": "tiny", "messages": messages}))
    assert error["param"] == "messages[2]"
    assert "tool_call_id" in error["message"]
    messages[2]["tool_call_id"] = "call_1"
    r = client.post(CHAT, json={"model": "tiny", "messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "10"),
        ("temperature", "0.5"),
        ("stream", "yes"),
        ("stream", 1),
        ("n", 1.0),
        ("n", True),
        ("logprobs", "true"),
        ("seed", "7"),
    ],
)
def test_strings_and_floats_are_not_coerced(client, field, value):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], field: value}
    assert _error(client.post(CHAT, json=body))["param"] == field


def test_stream_options_are_strict_too(client):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": "yes"},
    }
    assert _error(client.post(CHAT, json=body))["param"] == "stream_options.include_usage"


def test_deeply_nested_json_is_a_400(client):
    r = _raw(client, CHAT, "[" * 100_000 + "]" * 100_000)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    _still_serves(client)


def test_405_names_the_allowed_methods(client):
    r = client.put(CHAT, json={})
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_openapi_documents_the_error_answers(client):
    spec = client.get("/openapi.json").json()
    for path, method in [(CHAT, "post"), ("/v1/completions", "post"), ("/tokenize", "post")]:
        responses = spec["paths"][path][method]["responses"]
        for status in ("400", "404", "413"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse"), (path, status)
        assert "422" not in responses, "validation failures answer 400, not FastAPI's 422"
    stream = spec["paths"][CHAT]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream
    assert "HTTPValidationError" not in json.dumps(spec)


# ----- limits that are settings ---------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_client(start_module_server):
    live = start_module_server(
        "--max-n", "12", "--max-waiting", "10", "--max-model-len", "256", "--model-alias", "tiny"
    )
    with httpx.Client(base_url=live.url, timeout=60.0) as c:
        yield c


def test_max_n_setting_is_the_limit(limited_client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    r = limited_client.post(CHAT, json={**body, "n": 10})  # over the old hard-coded 8
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 10
    error = _error(limited_client.post(CHAT, json={**body, "n": 13}))
    assert error["param"] == "n"
    assert "12" in error["message"]


def test_a_request_larger_than_the_queue_is_a_400_not_a_429(limited_client):
    body = {"model": "tiny", "max_tokens": 1, "n": 4}
    r = limited_client.post("/v1/completions", json={**body, "prompt": ["a", "b", "c"]})
    error = _error(r)  # 12 sequences can never fit a queue of 10: retrying would not help
    assert error["param"] == "n"
    assert "10" in error["message"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert _error(limited_client.post(CHAT, json={**chat, "n": 11}))["param"] == "n"
    ok = limited_client.post("/v1/completions", json={**body, "prompt": ["a", "b"]})
    assert ok.status_code == 200, ok.text
