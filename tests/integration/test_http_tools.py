"""Tools, structured outputs and reasoning against a live server, over raw HTTP.

The tiny model has random weights: on its own it never writes JSON or tool-call markup, so
every well-formed result here is the grammar's doing (one test shows the same requests
without the constraint do not parse). Outputs are checked against the request's own schema
with a small validator below, never against hard-coded model text; streamed results are
compared with the same seeded or greedy request made without streaming.

Reasoning uses a copy of the tiny model whose chat template opens ``<think>`` in the
generation prompt unless ``enable_thinking`` is false (as Qwen3's does). The expected
prompts are rendered here with plain jinja2 and checked against the server's ``/tokenize``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest

from tests.live import LiveServer

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
SEEDS = range(6)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "pets": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"kind": {"type": "string", "maxLength": 8}},
                "required": ["kind"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "color", "pets"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -999, "maximum": 999},
        "b": {"type": "integer", "minimum": -999, "maximum": 999},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
LOOKBEHIND = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """The keywords of ``schema`` that ``value`` breaks (the subset the schemas above use).

    Args:
        value: A parsed JSON value.
        schema: A JSON schema using type, properties, required, additionalProperties, items,
            enum and the length / item-count / numeric bounds.
        path: Where ``value`` sits, for the messages.

    Returns:
        One message per violation; empty when ``value`` validates.
    """
    kinds = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}
    kind = schema.get("type")
    if kind in kinds and (
        not isinstance(value, kinds[kind]) or (kind == "integer" and isinstance(value, bool))
    ):
        return [f"{path}: {value!r} is not of type {kind}"]
    errors = [f"{path}: {value!r} not in enum"] if value not in schema.get("enum", [value]) else []
    size = len(value) if isinstance(value, str | list) else None
    for key, bad in (
        ("maxLength", lambda b: size > b),
        ("minLength", lambda b: size < b),
        ("maxItems", lambda b: size > b),
        ("minItems", lambda b: size < b),
        ("maximum", lambda b: value > b),
        ("minimum", lambda b: value < b),
    ):
        if key in schema and bad(schema[key]):
            errors.append(f"{path}: {value!r} breaks {key}={schema[key]}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: extra key {k!r}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def test_the_validator_catches_each_keyword():
    good = {"name": "Ann", "age": 30, "color": "red", "pets": [{"kind": "cat"}]}
    assert schema_errors(good, PERSON) == []
    bad = [{"age": True}, {"age": 151}, {"color": "pink"}, {"name": "x" * 17}, {"pets": [{}]}]
    bad += [{"pets": [{"kind": "a"}] * 4}, {"extra": 1}, {"pets": {"kind": "a"}}]
    for change in bad:
        assert len(schema_errors(good | change, PERSON)) == 1, change
    assert len(schema_errors({}, PERSON)) == 4


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text or "")
    except ValueError:
        return None


@pytest.fixture(scope="module")
def http(start_module_server) -> httpx.Client:
    """A client of a server with room for tool definitions (the tiny tokenizer is verbose)."""
    live = start_module_server("--model-alias", "tiny", "--max-model-len", "4096")
    with httpx.Client(base_url=live.url, timeout=60.0) as c:
        yield c


def _chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post(CHAT, json={"model": "tiny", "messages": USER, "max_tokens": 160, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


# ----- structured outputs ---------------------------------------------------------------------


def test_json_schema_output_validates_and_unconstrained_does_not_parse(http):
    unconstrained_valid = 0
    for seed in SEEDS:
        out = _chat(http, temperature=1.0, seed=seed, response_format=_schema_format(PERSON))
        [choice] = out["choices"]
        assert choice["finish_reason"] == "stop"
        value = json.loads(choice["message"]["content"])
        assert schema_errors(value, PERSON) == [], choice["message"]["content"]
        plain = _chat(http, temperature=1.0, seed=seed)["choices"][0]["message"]["content"]
        unconstrained_valid += _json_or_none(plain) is not None
    assert unconstrained_valid <= 1  # the constraint, not the model, makes the JSON


def test_json_schema_streamed_equals_non_streamed(http, sse):
    body = {"model": "tiny", "messages": USER, "max_tokens": 160, "temperature": 1.0, "seed": 3}
    body["response_format"] = _schema_format(PERSON)
    expected = _chat(http, **body)["choices"][0]["message"]["content"]
    chunks = sse(http, CHAT, body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_json_object_parses_to_an_object(http):
    objects = []
    for seed in SEEDS[:3]:
        fmt = {"type": "json_object"}
        [choice] = _chat(http, temperature=1.0, seed=seed, response_format=fmt)["choices"]
        assert choice["finish_reason"] == "stop", choice
        objects.append(json.loads(choice["message"]["content"]))
    assert all(isinstance(o, dict) for o in objects) and any(objects)


@pytest.mark.parametrize(
    "schema",
    [
        LOOKBEHIND,  # llguidance's regex engine has no look-around
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    ],
    ids=["lookbehind-pattern", "dangling-ref"],
)
def test_uncompilable_schema_is_a_400(http, schema):
    body = {"model": "tiny", "messages": USER, "response_format": _schema_format(schema)}
    r = http.post(CHAT, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format"
    assert error["message"]
    assert _chat(http, max_tokens=2, ignore_eos=True)["usage"]["completion_tokens"] == 2


# ----- tool calls -----------------------------------------------------------------------------


def _check_calls(choice: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    """Assert the OpenAI tool-call shape; return the calls."""
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] is None or "<tool_call>" not in message["content"]
    calls = message["tool_calls"]
    assert calls and len({c["id"] for c in calls}) == len(calls)
    for call in calls:
        assert isinstance(call["id"], str) and call["id"] and call["type"] == "function"
        fn = call["function"]
        assert fn["name"] in names
        assert isinstance(fn["arguments"], str)
        args = json.loads(fn["arguments"])
        assert schema_errors(args, PARAMS[fn["name"]]) == [], fn["arguments"]
    return calls


def _calls(http: httpx.Client, seed: int, **knobs: Any) -> list[dict[str, Any]]:
    """The checked tool calls of a seeded request with ``TOOLS``."""
    out = _chat(http, tools=TOOLS, temperature=1.0, seed=seed, **knobs)
    return _check_calls(out["choices"][0], set(PARAMS))


def test_required_tool_choice_returns_valid_calls(http):
    for seed in SEEDS:
        _calls(http, seed, tool_choice="required")


def test_named_tool_choice_calls_that_function(http):
    names = {c["function"]["name"] for s in SEEDS for c in _calls(http, s, tool_choice=NAMED)}
    assert names == {"get_weather"}


def test_parallel_tool_calls_false_keeps_one_call(http):
    counts = {
        parallel: [
            len(_calls(http, seed, tool_choice="required", parallel_tool_calls=parallel))
            for seed in SEEDS
        ]
        for parallel in (True, False)
    }
    assert counts[False] == [1] * len(SEEDS)
    assert max(counts[True]) > 1  # some seed calls twice when allowed: the limit is real


def test_n_choices_each_get_their_own_calls(http):
    out = _chat(http, tools=TOOLS, tool_choice="required", n=3, temperature=1.0, seed=1)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    ids = [call["id"] for c in out["choices"] for call in _check_calls(c, set(PARAMS))]
    assert len(set(ids)) == len(ids)


def _streamed_calls(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Check tool-call deltas chunk by chunk and reassemble them by ``index``."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            assert "<tool_call>" not in (delta.get("content") or "")
            for piece in delta.get("tool_calls") or []:
                index, fn = piece["index"], piece["function"]
                if index not in calls:  # the first delta of a call says everything but args
                    assert isinstance(piece["id"], str) and piece["id"]
                    assert piece["type"] == "function" and fn["name"] in PARAMS
                    assert fn["arguments"] == ""
                    calls[index] = {"id": piece["id"], "name": fn["name"], "arguments": ""}
                else:
                    assert set(piece) == {"index", "function"} and set(fn) == {"arguments"}
                    calls[index]["arguments"] += fn["arguments"]
    return calls


@pytest.mark.parametrize("choice", ["named-greedy", "required-parallel"])
def test_streamed_tool_calls_reassemble_to_the_non_streamed_ones(http, sse, choice):
    body = {"model": "tiny", "messages": USER, "max_tokens": 160, "tools": TOOLS}
    if choice == "named-greedy":
        body.update(tool_choice=NAMED, temperature=0)
    else:  # the first seed whose answer has several calls, so that indices past 0 are seen
        seed = next(s for s in SEEDS if len(_calls(http, s, tool_choice="required")) > 1)
        body.update(tool_choice="required", temperature=1.0, seed=seed)
    expected = _check_calls(_chat(http, **body)["choices"][0], set(PARAMS))
    chunks = sse(http, CHAT, body)
    calls = _streamed_calls(chunks)
    assert sorted(calls) == list(range(len(expected)))
    for index, call in enumerate(expected):
        assert calls[index]["name"] == call["function"]["name"]
        assert calls[index]["arguments"] == call["function"]["arguments"]
    assert len(chunks) > len(expected) + 2  # arguments arrive in pieces, not in one go
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_results_go_back_through_the_template(http):
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    out = _chat(http, messages=messages, max_tokens=4)
    r = http.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    assert out["usage"]["prompt_tokens"] == r.json()["count"]
    rendered = http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert '"get_weather"' in rendered and '{"city": "Paris"}' in rendered
    assert "sunny, 21 C" in rendered
    with_tools = _chat(http, messages=messages, tools=TOOLS, tool_choice=NAMED)
    _check_calls(with_tools["choices"][0], {"get_weather"})


def test_a_tool_parser_setting_picks_the_markup_constrained_and_parsed(start_server, sse):
    """``--tool-parser hermes_parameters``: its grammar writes the markup, its parser reads it."""
    flags = ("--model-alias", "tiny", "--max-model-len", "4096")
    live = start_server(*flags, "--tool-parser", "hermes_parameters")
    body = {"model": "tiny", "messages": USER, "max_tokens": 160, "tools": TOOLS}
    body.update(tool_choice=NAMED, temperature=0, logprobs=True)
    with httpx.Client(base_url=live.url, timeout=60.0) as http:
        for seed in SEEDS[:3]:
            _calls(http, seed, tool_choice="required")
        [choice] = _chat(http, **body)["choices"]
        expected = _check_calls(choice, {"get_weather"})
        raw = "".join(t["token"] for t in choice["logprobs"]["content"])
        assert raw.startswith('<tool_call>\n{"name": "get_weather", "parameters": {'), raw
        calls = _streamed_calls(sse(http, CHAT, body))
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (e["function"]["name"], e["function"]["arguments"]) for e in expected
    ]


BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": LOOKBEHIND}}
UNKNOWN = {"type": "function", "function": {"name": "nope"}}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": TOOLS, "tool_choice": UNKNOWN}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "required"),
        ({"tools": [BAD_TOOL], "tool_choice": "required"}, "tools", "'f'"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "response_format",
        ),
    ],
    ids=["unknown-function", "required-without-tools", "bad-parameters", "with-response-format"],
)
def test_bad_tool_requests_are_400s(http, body, param, words):
    r = http.post(CHAT, json={"model": "tiny", "messages": USER, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


# ----- reasoning ------------------------------------------------------------------------------

# Qwen3-style: thinking is on unless the caller passes enable_thinking=false. Every newline
# is written by an expression, so the rendering does not depend on jinja's whitespace options.
THINKING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def _render(messages: list[dict[str, str]], **kwargs: Any) -> str:
    return (
        jinja2.Environment()
        .from_string(THINKING_TEMPLATE)
        .render(messages=messages, add_generation_prompt=True, **kwargs)
    )


@pytest.fixture(scope="module")
def thinking(tiny_model: Path, tmp_path_factory) -> httpx.Client:
    """A client of a server for a copy of the tiny model with the thinking template."""
    root = tmp_path_factory.mktemp("thinking")
    model = shutil.copytree(tiny_model, root / "model")
    (model / "chat_template.jinja").write_text(THINKING_TEMPLATE, encoding="utf-8")
    live = LiveServer.start(model, "--model-alias", "tiny", log_dir=root)
    try:
        with httpx.Client(base_url=live.url, timeout=60.0) as c:
            yield c
    finally:
        live.stop()


def _prompt_count(http: httpx.Client, **body: Any) -> int:
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def _completion_text(http: httpx.Client, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = http.post("/v1/completions", json={**body, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_generation_inside_think_is_reasoning(thinking, sse):
    body = {"model": "tiny", "messages": USER, "max_tokens": 16, "temperature": 0}
    body["ignore_eos"] = True
    prompt = _render(USER)
    assert _prompt_count(thinking, messages=USER) == _prompt_count(thinking, prompt=prompt)
    out = _chat(thinking, **body)
    [choice] = out["choices"]
    assert choice["finish_reason"] == "length"  # no </think>: everything is reasoning
    assert choice["message"]["content"] in (None, "")
    raw = _completion_text(thinking, prompt, 16)
    assert raw["usage"]["prompt_tokens"] == out["usage"]["prompt_tokens"]
    assert choice["message"]["reasoning_content"] == raw["choices"][0]["text"] != ""
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    chunks = sse(thinking, CHAT, {**body, "stream_options": {"include_usage": True}})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == raw["choices"][0]["text"]
    assert all(not d.get("content") for d in deltas)
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


def test_enable_thinking_false_reaches_the_template(thinking):
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    off, on = _render(USER, enable_thinking=False), _render(USER)
    off_count = _prompt_count(thinking, prompt=off)
    assert off_count != _prompt_count(thinking, prompt=on)
    out = _chat(thinking, max_tokens=12, temperature=0, ignore_eos=True, **kwargs)
    assert out["usage"]["prompt_tokens"] == off_count
    [choice] = out["choices"]
    assert not choice["message"].get("reasoning_content")
    assert choice["message"]["content"] == _completion_text(thinking, off, 12)["choices"][0]["text"]
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_constrained_output_is_never_reasoning(thinking):
    """The grammar holds from the first token, so an opened ``<think>`` does not swallow it."""
    fmt = _schema_format(PERSON)
    [choice] = _chat(thinking, temperature=1.0, seed=0, response_format=fmt)["choices"]
    assert not choice["message"].get("reasoning_content")
    assert schema_errors(json.loads(choice["message"]["content"]), PERSON) == []
    [choice] = _chat(thinking, temperature=1.0, seed=0, tools=TOOLS, tool_choice=NAMED)["choices"]
    assert not choice["message"].get("reasoning_content")
    _check_calls(choice, {"get_weather"})
