"""Tests for server/text/formats/hermes_parameters.py: detection, parsing, constraint grammar."""

from __future__ import annotations

import json

import pytest

from moeserve.server.text.chat_template import CHATML_TEMPLATE, compile_chat_template
from moeserve.server.text.formats import ToolCallArgs, ToolCallStart, detect_tool_format
from moeserve.server.text.formats.hermes_parameters import HermesParametersFormat
from tests.helpers import validate
from tests.unit.server.text.formats.helpers import (
    SEEDS,
    TOOL_SCHEMAS,
    TOOLS,
    content_of,
    generate,
    one_shot_equals_every_chunking,
    run,
)

# A template as a fine-tune that calls the arguments "parameters" writes it.
TEMPLATE = """{%- for message in messages %}{{ message.content or "" }}
{%- for tc in message.tool_calls or [] %}
<tool_call>
{"name": {{ tc.function.name | tojson }}, "parameters": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}{%- endfor %}"""
# The same instructions written inside a double-quoted Jinja string (escaped quotes).
ESCAPED = r"""{{- "<tool_call>\n{\"name\": <name>, \"parameters\": <object>}\n</tool_call>" }}"""
# Qwen-family templates: both key spellings of Qwen2.5's, and the tool list's "parameters".
QWEN25_LIKE = (
    r"""{{- "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}" }}"""
    """{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}"""
    """{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"""
)
HERMES2_PRO_LIKE = (
    """{"properties": {"name": {"type": "string"}, "arguments": {"type": "object"}}}\n"""
    """{"type": "function", "function": {"name": "f", "parameters": {}}}\n"""
    """<tool_call>\n{"arguments": <args-dict>, "name": <function-name>}\n</tool_call>"""
)


def call(name: str, args: dict) -> str:
    body = json.dumps({"name": name, "parameters": args}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


# --- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [TEMPLATE, ESCAPED])
def test_detects_its_templates_before_qwen(template: str) -> None:
    assert HermesParametersFormat.detect(template, ())
    assert detect_tool_format(template, None) == "hermes_parameters"


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, QWEN25_LIKE, HERMES2_PRO_LIKE])
def test_never_takes_a_qwen_template(template: str) -> None:
    assert not HermesParametersFormat.detect(template, ())
    assert detect_tool_format(template, None) == "qwen"


def test_needs_tool_call_markup_and_not_the_coder_xml() -> None:
    assert not HermesParametersFormat.detect('{"name": "f", "parameters": {}}', ())
    coder = '<tool_call>\n<function=f>\n{"parameters": 1}'
    assert not HermesParametersFormat.detect(coder, ())


# --- parsing ------------------------------------------------------------------------------------


def test_single_call_with_content_before() -> None:
    text = "Let me look.\n" + call("get_weather", {"city": "Paris", "unit": "c"})
    events, calls = one_shot_equals_every_chunking(HermesParametersFormat, text, pairs=True)
    args = '{"city": "Paris", "unit": "c"}'
    assert events == [("content", "Let me look."), ("start", 0, "get_weather"), ("args", 0, args)]
    assert calls == [("get_weather", args)]


def test_renders_of_its_template_parse_back() -> None:
    calls_in = [("get_weather", {"city": "Zürich", "q": "a } b"}), ("noop", {})]
    tool_calls = [{"function": {"name": n, "arguments": a}} for n, a in calls_in]
    message = {"role": "assistant", "content": "Checking.", "tool_calls": tool_calls}
    reply = compile_chat_template(TEMPLATE).render(messages=[message])
    result = one_shot_equals_every_chunking(HermesParametersFormat, reply)
    assert [(n, json.loads(a)) for n, a in result[1]] == calls_in
    assert content_of(result) == "Checking."


@pytest.mark.parametrize(
    ("body", "name", "args"),
    [
        ('{"parameters": {"x": 1}, "name": "late"}', "late", '{"x": 1}'),
        ('{"name": "a", "arguments": {"k": [1]}}', "a", '{"k": [1]}'),  # qwen's key is read too
        ('{"name": "bare"}', "bare", "{}"),
    ],
)
def test_variants(body: str, name: str, args: str) -> None:
    text = f"<tool_call>\n{body}\n</tool_call>"
    assert one_shot_equals_every_chunking(HermesParametersFormat, text) == (
        [("start", 0, name), ("args", 0, args)],
        [(name, args)],
    )


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "f", "parameters": [1]}\n</tool_call>',
        '<tool_call>\n{"name": "f", "parameters": {"a": 1}, "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "parameters": {"a": ',
    ],
)
def test_malformed_call_becomes_content(text: str) -> None:
    events, calls = one_shot_equals_every_chunking(HermesParametersFormat, text)
    assert calls == [] and events[0] == ("start", 0, "f")
    assert content_of((events, calls)) == text


def test_streams_the_parameters_as_generated() -> None:
    parser = HermesParametersFormat()
    (start,) = parser.feed('<tool_call>\n{"name": "f", "para')
    assert isinstance(start, ToolCallStart) and start.name == "f"
    assert parser.feed('meters": {"a": "x') == [ToolCallArgs(0, '{"a": "x')]
    assert parser.feed('y"}}\n</tool_call>') == [ToolCallArgs(0, 'y"}')]
    assert parser.finish() == [] and parser.calls[0].arguments == '{"a": "xy"}'


# --- constrained generation ---------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
def test_constrained_calls_follow_names_and_schemas(engine, tokenizer, parallel: bool) -> None:
    names = ["get_weather", "get_time"]
    constraint = engine.grammar.tool_calls(TOOLS, names, HermesParametersFormat, parallel)
    counts = []
    for text, finish in generate(engine, tokenizer, constraint, SEEDS):
        assert finish == "stop", text
        blocks = text.split("\n")
        assert len(blocks) % 3 == 0, text
        calls = []
        for i in range(0, len(blocks), 3):
            assert blocks[i : i + 3 : 2] == ["<tool_call>", "</tool_call>"], text
            calls.append(json.loads(blocks[i + 1]))
        for c in calls:
            assert list(c) == ["name", "parameters"] and c["name"] in names
            validate(c["parameters"], TOOL_SCHEMAS[c["name"]])
        events, parsed = run(HermesParametersFormat, [text])
        assert [(n, json.loads(a)) for n, a in parsed] == [
            (c["name"], c["parameters"]) for c in calls
        ]
        assert content_of((events, parsed)) == ""
        counts.append(len(calls))
    assert counts == [1] * len(SEEDS) if not parallel else max(counts) <= 4
    named = engine.grammar.tool_calls(TOOLS, ["get_time"], HermesParametersFormat, False)
    ((text, _),) = generate(engine, tokenizer, named, [0])
    assert text == '<tool_call>\n{"name": "get_time", "parameters": {}}\n</tool_call>'
