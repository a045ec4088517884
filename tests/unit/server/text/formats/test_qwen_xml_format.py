"""Tests for server/text/formats/qwen_xml.py: Qwen3-Coder and Qwen3.5 tool calls, their grammar."""

from __future__ import annotations

import json
import re

import pytest

from moeserve.server.text.formats import ContentDelta, ToolCallArgs, ToolCallStart
from moeserve.server.text.formats.qwen_xml import QwenXmlFormat
from tests.helpers import validate
from tests.unit.server.text.formats.helpers import (
    SEEDS,
    TOOL_SCHEMAS,
    TOOLS,
    WEATHER,
    content_of,
    generate,
    one_shot_equals_every_chunking,
    run,
)

TYPED = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "zip": {"type": "string"},
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "force": {"type": "boolean"},
        "opts": {"type": "object"},
        "tags": {"type": "array"},
        "note": {"type": ["string", "null"]},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "ref": {"$ref": "#/$defs/n"},
    },
    "$defs": {"n": {"type": "integer"}},
}
TYPED_TOOLS = [{"type": "function", "function": {"name": "edit", "parameters": TYPED}}]


def xml_call(name: str, params: dict[str, str]) -> str:
    """A call as the templates write it: each value's text between newlines."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def typed() -> QwenXmlFormat:
    return QwenXmlFormat(TYPED_TOOLS)


def test_values_take_the_schema_types() -> None:
    params = {
        "path": "src/a b.py",
        "zip": "00042",  # a string parameter stays a string even when it looks like a number
        "count": "7",
        "ratio": "-0.5e1",
        "force": "True",  # Python's spelling, as Qwen3.5's template writes booleans
        "opts": "{'deep': {'x': [1, None]}, 'f': False}",  # Python's repr (Qwen3-Coder's template)
        "tags": '["a", 1]',
        "note": "None",
        "limit": "null",
        "ref": "3",
    }
    events, calls = one_shot_equals_every_chunking(typed, xml_call("edit", params))
    assert [(n, json.loads(a)) for n, a in calls] == [
        (
            "edit",
            {
                "path": "src/a b.py",
                "zip": "00042",
                "count": 7,
                "ratio": -5.0,
                "force": True,
                "opts": {"deep": {"x": [1, None]}, "f": False},
                "tags": ["a", 1],
                "note": None,
                "limit": None,
                "ref": 3,
            },
        )
    ]
    assert events[0] == ("start", 0, "edit") and len(events) == 2


@pytest.mark.parametrize(
    ("param", "text"),
    [
        ("count", "seven"),  # not an integer: kept as the model wrote it
        ("count", "true"),  # a boolean is not an integer
        ("force", "1"),
        ("opts", "[1]"),
        ("tags", "__import__('os')"),  # literal_eval evaluates no code
        ("ratio", "NaN"),
        ("undeclared", "42"),  # not in the schema: a string
    ],
)
def test_values_of_the_wrong_type_stay_strings(param: str, text: str) -> None:
    _, calls = run(typed, [xml_call("edit", {param: text})])
    assert json.loads(calls[0][1]) == {param: text}


def test_without_tools_every_value_is_a_string_and_text_is_exact() -> None:
    params = {
        "code": "def f():\n    return '<b>' # </function> inside a value\n",
        "blank": "",
        "spaced": "  padded  ",
        "unicode": "héllo 你好 🙂",
        "n": "5",
    }
    text = "Let me edit.\n\n" + xml_call("write", params) + "\nDone."
    events, calls = one_shot_equals_every_chunking(QwenXmlFormat, text)
    assert [(n, json.loads(a)) for n, a in calls] == [("write", params)]
    assert content_of((events, calls)) == "Let me edit.\nDone."


def test_several_calls_and_calls_without_parameters() -> None:
    text = (
        xml_call("get_weather", {"city": "Rome", "unit": "c"})
        + "\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>"
        + "<tool_call><function=get_time></function></tool_call>"  # no newlines at all
    )
    _, calls = one_shot_equals_every_chunking(lambda: QwenXmlFormat(TOOLS), text)
    assert calls == [
        ("get_weather", '{"city": "Rome", "unit": "c"}'),
        ("get_time", "{}"),
        ("get_time", "{}"),
    ]


def test_streams_one_piece_per_parameter() -> None:
    parser = QwenXmlFormat(TOOLS)
    assert parser.feed("Sure.\n<tool_call>\n<function=get_wea") == [ContentDelta("Sure.")]
    (start,) = parser.feed("ther>\n<parameter=city>\nPar")
    assert isinstance(start, ToolCallStart) and start.name == "get_weather"
    assert parser.feed("is\n</parameter>\n") == [ToolCallArgs(0, '{"city": "Paris"')]
    assert parser.feed("<parameter=days>\n3\n</parameter>\n") == [ToolCallArgs(0, ', "days": 3')]
    assert parser.feed("</function>\n</tool") == [ToolCallArgs(0, "}")]
    assert parser.feed("_call>") + parser.finish() == []
    assert json.loads(parser.calls[0].arguments) == {"city": "Paris", "days": 3}


@pytest.mark.parametrize("tail", ["", "\n", "\n</tool", "\n</tool_call"])
def test_finished_function_without_end_tag_at_end_of_stream(tail: str) -> None:
    text = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>" + tail
    assert one_shot_equals_every_chunking(QwenXmlFormat, text) == (
        [("start", 0, "f"), ("args", 0, '{"a": "1"}')],
        [("f", '{"a": "1"}')],
    )


@pytest.mark.parametrize(
    "text",
    [
        "I write <tool_call> tags.",
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',  # the JSON format
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        "<tool_call>\n<function=a b>\n</function>\n</tool_call>",
        "<tool_call>\n<function=f",
        "<tool_call>\n",
    ],
)
def test_malformed_before_the_name_is_all_content(text: str) -> None:
    assert one_shot_equals_every_chunking(QwenXmlFormat, text) == ([("content", text)], [])


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n",  # cut off
        "<tool_call>\n<function=f>\n<parameter=a>\n1",
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n<parameter=b>\n2\n</parameter>\n</function>",
        "<tool_call>\n<function=f>\nstray\n</function>\n</tool_call>",
        "<tool_call>\n<function=f>\n</function>\ntrailing</tool_call>",
        "<tool_call><function=f><parameter=a>1</parameter><parameter=a>2</parameter></function>",
        "<tool_call>\n<function=f>\n<parameter=>\n1\n</parameter>\n</function>\n</tool_call>",
    ],
)
def test_call_failing_after_its_start_becomes_content(text: str) -> None:
    events, calls = one_shot_equals_every_chunking(QwenXmlFormat, text)
    assert calls == [] and events[0] == ("start", 0, "f")
    assert content_of((events, calls)) == text


def test_failed_call_then_good_call() -> None:
    bad = "<tool_call>\n<function=f>\nnonsense\n</function>\n</tool_call>"
    good = xml_call("g", {"z": "1"})
    events, calls = one_shot_equals_every_chunking(QwenXmlFormat, f"{bad}\n{good}")
    assert calls == [("g", '{"z": "1"}')] and ("start", 1, "g") in events
    assert content_of((events, calls)) == bad


# --- constrained generation ---------------------------------------------------------------------

PARAM = re.compile(r"<parameter=([^>\n]+)>\n(.*?)\n</parameter>\n", re.S)
CALL = re.compile(
    r"<tool_call>\n<function=(\w+)>\n((?:<parameter=.*?</parameter>\n)*)</function>\n</tool_call>",
    re.S,
)


def xml_calls(text: str) -> list[tuple[str, dict]]:
    """The calls of constrained output, read independently of the parser: exact layout."""
    calls, pos = [], 0
    while pos < len(text):
        match = CALL.match(text, pos)
        assert match, text
        params = dict(PARAM.findall(match[2]))
        assert (
            "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items()) == match[2]
        )
        calls.append((match[1], params))
        pos = match.end() + (1 if text[match.end() : match.end() + 1] == "\n" else 0)
    return calls


@pytest.mark.parametrize("parallel", [False, True])
def test_constrained_calls_follow_names_and_schemas(engine, tokenizer, parallel: bool) -> None:
    names = ["get_weather", "get_time"]
    constraint = engine.grammar.tool_calls(TOOLS, names, QwenXmlFormat, parallel)
    counts = []
    for text, finish in generate(engine, tokenizer, constraint, SEEDS):
        assert finish == "stop", text
        calls = xml_calls(text)
        counts.append(len(calls))
        parsed_back = []
        for name, params in calls:
            assert name in names
            schema = TOOL_SCHEMAS[name]
            props = schema.get("properties", {})
            args = {
                k: v if props[k]["type"] == "string" else json.loads(v) for k, v in params.items()
            }
            validate(args, schema)
            parsed_back.append((name, args))
        # The format's own parser, given the tools, reads back the same calls and nothing else.
        events, parsed = run(lambda: QwenXmlFormat(TOOLS), [text])
        assert [(n, json.loads(a)) for n, a in parsed] == parsed_back
        assert content_of((events, parsed)) == ""
    assert counts == [1] * len(SEEDS) if not parallel else max(counts) <= 4
    named = engine.grammar.tool_calls(TOOLS, ["get_time"], QwenXmlFormat, False)
    ((text, _),) = generate(engine, tokenizer, named, [0])
    assert text == "<tool_call>\n<function=get_time>\n</function>\n</tool_call>"


def test_constrained_strings_keep_their_length_bounds(engine, tokenizer) -> None:
    constraint = engine.grammar.tool_calls(TOOLS, ["get_weather"], QwenXmlFormat, False)
    for text, _ in generate(engine, tokenizer, constraint, range(4)):
        ((_, params),) = xml_calls(text)
        assert len(params["city"]) <= WEATHER["properties"]["city"]["maxLength"]
        assert params["unit"] in ("c", "f")


# --- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("<tool_call>\n<function={{ tc.name }}>\n<parameter={{ k }}>\n{{ v }}\n</parameter>", True),
        ('<tool_call>\n{"name": "{{ n }}", "arguments": {{ a }}}', False),
        ("<function=example_function_name>", False),  # no parameters: not this format
    ],
)
def test_detect(template: str, expected: bool) -> None:
    assert QwenXmlFormat.detect(template, ()) is expected
