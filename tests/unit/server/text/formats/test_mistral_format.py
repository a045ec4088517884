"""Tests for server/text/formats/mistral.py: Mistral's [TOOL_CALLS] forms and their grammar."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken

from moeserve.server.engine.grammar import GrammarCompiler
from moeserve.server.text.formats import ContentDelta, ToolCallArgs, ToolCallStart
from moeserve.server.text.formats.mistral import MistralFormat
from moeserve.server.text.tokenizer import Tokenizer
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

TRICKY = {"q": 'a ] b [ } { \\" [TOOL_CALLS] ,', "n": [1, {"m": None}], "u": "héllo 🙂"}


def v3(*calls: tuple[str, dict], ids: bool = True) -> str:
    """Calls as Mistral's v3 template renders them (tojson of the function, then the id)."""
    items = []
    for k, (name, args) in enumerate(calls):
        item = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
        items.append(item[:-1] + f', "id": "abcdefgh{k}"}}' if ids else item)
    return "[TOOL_CALLS] [" + ", ".join(items) + "]"


def test_v3_array_of_calls() -> None:
    text = v3(("get_weather", {"city": "Paris"}), ("search", TRICKY))
    events, calls = one_shot_equals_every_chunking(MistralFormat, text, pairs=True)
    assert [(n, json.loads(a)) for n, a in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("search", TRICKY),
    ]
    assert [e[0] for e in events] == ["start", "args", "start", "args"]


def test_v3_variants() -> None:
    # Content before the marker, compact JSON, arguments as a JSON string, "id" first, no
    # arguments, no space after the marker.
    text = (
        'Checking. [TOOL_CALLS][{"name":"a","arguments":"{\\"x\\": 1}"},'
        '{"id": "123456789", "name": "b"},{"name": "c", "arguments": {}}]'
    )
    events, calls = one_shot_equals_every_chunking(MistralFormat, text)
    assert calls == [("a", '{"x": 1}'), ("b", "{}"), ("c", "{}")]
    assert content_of((events, calls)) == "Checking."


def test_v11_name_args_form() -> None:
    text = (
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome", "days": 2}'
        "[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}"
        f"[TOOL_CALLS]search[ARGS]{json.dumps(TRICKY, ensure_ascii=False)}"
    )
    events, calls = one_shot_equals_every_chunking(MistralFormat, text)
    assert [(n, json.loads(a)) for n, a in calls] == [
        ("get_weather", {"city": "Rome", "days": 2}),
        ("get_time", {}),
        ("search", TRICKY),
    ]
    assert content_of((events, calls)) == ""


def test_streams_arguments_as_generated() -> None:
    parser = MistralFormat()
    assert parser.feed("Sure [TOOL_") == [ContentDelta("Sure")]
    (start,) = parser.feed('CALLS] [{"name": "f", "argu')
    assert isinstance(start, ToolCallStart) and (start.index, start.name) == (0, "f")
    assert parser.feed('ments": {"a": ') == [ToolCallArgs(0, '{"a": ')]
    first_done, second = parser.feed('1}}, {"name": "g"')
    assert first_done == ToolCallArgs(0, "1}")  # the next element starts the next call
    assert isinstance(second, ToolCallStart) and (second.index, second.name) == (1, "g")
    rest = parser.feed(', "arguments": {}}]') + parser.finish()
    assert [type(e) for e in rest] == [ToolCallArgs]
    assert [(c.name, c.arguments) for c in parser.calls] == [("f", '{"a": 1}'), ("g", "{}")]


def test_an_array_the_stream_cut_keeps_its_closed_elements() -> None:
    text = '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}'
    assert one_shot_equals_every_chunking(MistralFormat, text)[1] == [("f", '{"a": 1}')]


@pytest.mark.parametrize(
    "text",
    [
        "I never write [TOOL_CALLS] as text.",
        "[TOOL_CALLS] [not json]",
        "[TOOL_CALLS] []",
        '[TOOL_CALLS] {"name": "f", "arguments": {}}',  # not in an array
        "[TOOL_CALLS][ARGS]{}",  # no name
        "[TOOL_CALLS]get weather[ARGS]{}",
        "[TOOL_CALLS]",
        "[TOOL_CA",
    ],
)
def test_malformed_before_the_name_is_all_content(text: str) -> None:
    assert one_shot_equals_every_chunking(MistralFormat, text) == ([("content", text)], [])


@pytest.mark.parametrize(
    "text",
    [
        '[TOOL_CALLS] [{"name": "f", "arguments": {"a": tru}}]',
        '[TOOL_CALLS] [{"name": "f", "arguments": [1]}]',
        '[TOOL_CALLS] [{"name": "f", "arguments": {}} junk]',
        '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1',
        "[TOOL_CALLS]f[ARGS][1, 2]",
        '[TOOL_CALLS]f[ARGS]{"a": ',
    ],
)
def test_call_failing_after_its_start_becomes_content(text: str) -> None:
    events, calls = one_shot_equals_every_chunking(MistralFormat, text)
    assert calls == [] and events[0] == ("start", 0, "f")
    assert content_of((events, calls)) == text


def test_a_bad_element_after_good_ones() -> None:
    text = '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b", "arguments": oops}]'
    events, calls = one_shot_equals_every_chunking(MistralFormat, text)
    assert calls == [("a", "{}")] and ("start", 1, "b") in events
    # The closed element stays a call; the rest of the array comes back as text.
    assert content_of((events, calls)) == '[TOOL_CALLS], {"name": "b", "arguments": oops}]'


# --- constrained generation ---------------------------------------------------------------------


def array_calls(text: str) -> list[dict]:
    """The calls of constrained output, read independently of the parser: exact layout."""
    assert text.startswith("[TOOL_CALLS] ["), text
    calls = json.loads(text[len("[TOOL_CALLS] ") :])
    assert json.dumps(calls, ensure_ascii=False) == text[len("[TOOL_CALLS] ") :], text
    return calls


@pytest.mark.parametrize("parallel", [False, True])
def test_constrained_calls_follow_names_and_schemas(engine, tokenizer, parallel: bool) -> None:
    names = ["get_weather", "get_time"]
    constraint = engine.grammar.tool_calls(TOOLS, names, MistralFormat, parallel)
    counts = []
    for text, finish in generate(engine, tokenizer, constraint, SEEDS):
        assert finish == "stop", text
        calls = array_calls(text)
        counts.append(len(calls))
        for call in calls:
            assert list(call) == ["name", "arguments"] and call["name"] in names
            validate(call["arguments"], TOOL_SCHEMAS[call["name"]])
        events, parsed = run(MistralFormat, [text])
        assert [(n, json.loads(a)) for n, a in parsed] == [
            (c["name"], c["arguments"]) for c in calls
        ]
        assert content_of((events, parsed)) == ""
    assert counts == [1] * len(SEEDS) if not parallel else max(counts) <= 4
    named = engine.grammar.tool_calls(TOOLS, ["get_time"], MistralFormat, False)
    ((text, _),) = generate(engine, tokenizer, named, [0])
    assert text == '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]'


def test_the_marker_is_used_as_its_control_token(tokenizer) -> None:
    backend = tokenizer.backend.from_str(tokenizer.backend.to_str())
    backend.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True, normalized=False)])
    special = Tokenizer(backend, eos_token="<|im_end|>")
    compiler = GrammarCompiler(special)
    constraint = compiler.tool_calls(TOOLS, ["get_time"], MistralFormat, False)
    marker = backend.token_to_id("[TOOL_CALLS]")
    good = [marker, *special.encode(' [{"name": "get_time", "arguments": {}}]')]
    matcher = compiler.matcher(constraint)
    assert all(matcher.consume(t) for t in good) and matcher.is_done
    spelled = compiler.matcher(constraint)
    assert not spelled.consume(special.encode("[")[0])


# --- detection ----------------------------------------------------------------------------------


def test_detect() -> None:
    assert MistralFormat.detect('{{- "[TOOL_CALLS] [" }}', ())
    assert MistralFormat.detect("{{- '[TOOL_CALLS]' + tool.name + '[ARGS]' }}", ())
    assert not MistralFormat.detect("{{ '[INST] ' + m['content'] + ' [/INST]' }}", ())
