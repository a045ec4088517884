"""Tests for server/text/formats/qwen.py: parsing the qwen format and its constraint grammar."""

from __future__ import annotations

import json

import pytest

from moeserve.server.text.chat_template import CHATML_TEMPLATE, compile_chat_template
from moeserve.server.text.formats import ContentDelta, ToolCallArgs, ToolCallStart
from moeserve.server.text.formats.qwen import QwenFormat
from tests.helpers import validate
from tests.unit.server.text.formats.helpers import (
    SEEDS,
    TOOL_SCHEMAS,
    TOOLS,
    content_of,
    generate,
    one_shot_equals_every_chunking,
    qwen_calls,
    run,
)

QWEN_ONE = (
    "Let me look.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
)

# Braces, brackets, escaped quotes and the end tag inside strings, unicode, empty containers.
TRICKY_ARGS = {
    "q": 'a } b { \\" c ] [ </tool_call> <tool_call>',
    "nested": {"l": [1, {"m": None}, []], "e": {}},
    "u": "héllo 你好 🙂",
    "esc": "é\n\t\\",
    "n": -1.5e-3,
    "b": False,
}


def qwen_call(name: str, args: dict, compact: bool = False) -> str:
    separators = (",", ":") if compact else None
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False, separators=separators)
    return f"<tool_call>\n{body}\n</tool_call>"


def test_qwen_single_call_with_content_before() -> None:
    events, calls = one_shot_equals_every_chunking(QwenFormat, QWEN_ONE, pairs=True)
    args = '{"city": "Paris", "unit": "celsius"}'
    assert events == [
        ("content", "Let me look."),
        ("start", 0, "get_weather"),
        ("args", 0, args),
    ]
    assert calls == [("get_weather", args)]


def test_qwen_tricky_arguments_exact_text() -> None:
    args_text = json.dumps(TRICKY_ARGS, ensure_ascii=False)
    text = f'<tool_call>\n{{"name": "search", "arguments": {args_text}}}\n</tool_call>'
    events, calls = one_shot_equals_every_chunking(QwenFormat, text)
    assert calls == [("search", args_text)]
    assert json.loads(calls[0][1]) == TRICKY_ARGS
    assert events == [("start", 0, "search"), ("args", 0, args_text)]


def test_qwen_several_calls_with_content_around() -> None:
    first, second = {"a": [1, 2]}, {"path": "/tmp/x y", "deep": {"k": {"k": "}"}}}
    text = (
        f"I'll call two tools.\n\n{qwen_call('alpha', first)}\n{qwen_call('beta', second, True)}"
        "\nBoth done. "
    )
    events, calls = one_shot_equals_every_chunking(QwenFormat, text)
    assert [(n, json.loads(a)) for n, a in calls] == [("alpha", first), ("beta", second)]
    # Whitespace that only separates content and calls is markup; the rest is content.
    assert content_of((events, calls)) == "I'll call two tools.\nBoth done. "
    assert [e[0] for e in events] == ["content", "start", "args", "start", "args", "content"]


def test_qwen_renders_of_the_chatml_template_parse_back() -> None:
    # The fallback template is what the model is shown; its own rendering must parse back.
    calls_in = [("get_weather", {"city": "Zürich"}), ("noop", {}), ("f", TRICKY_ARGS)]
    tool_calls = [{"function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls_in]
    message = {"role": "assistant", "content": "Checking.", "tool_calls": tool_calls}
    prompt = compile_chat_template(CHATML_TEMPLATE).render(messages=[message])
    reply = prompt.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    result = one_shot_equals_every_chunking(QwenFormat, reply)
    assert [(n, json.loads(a)) for n, a in result[1]] == calls_in
    assert content_of(result) == "Checking."


@pytest.mark.parametrize(
    ("body", "name", "args"),
    [
        ('{"arguments": {"x": "}"}, "name": "late"}', "late", '{"x": "}"}'),
        ('{"name": "s", "arguments": "{\\"a\\": [1, \\"}\\"]}"}', "s", '{"a": [1, "}"]}'),
        ('{"name": "bare"}', "bare", "{}"),
        ('{"name":"p","parameters":{"k":1}}', "p", '{"k":1}'),
        ('{ "id": 7, "name" : "extra", "arguments" : { } , "x": [true] }', "extra", "{ }"),
        ('{"name": "last", "arguments": {"a": 1}, "n": 1}', "last", '{"a": 1}'),
    ],
)
def test_qwen_variants(body: str, name: str, args: str) -> None:
    text = f"<tool_call>\n{body}\n</tool_call>"
    events, calls = one_shot_equals_every_chunking(QwenFormat, text)
    assert calls == [(name, args)]
    assert events == [("start", 0, name), ("args", 0, args)]


@pytest.mark.parametrize(
    "text",
    [
        "Wrap calls in <tool_call> tags, like <tool_call>this</tool_call>.",
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>{"name": 5, "arguments": {}}</tool_call>',
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',
        '<tool_call>{"arguments": {"a": 1}}</tool_call>',
        "<tool_call>{}</tool_call>",
        "<tool_call",
        "ends with a half tag <tool_",
        "<tool_call>\n",
    ],
)
def test_qwen_malformed_before_the_name_is_all_content(text: str) -> None:
    result = one_shot_equals_every_chunking(QwenFormat, text)
    assert result == ([("content", text)], [])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "f", "arguments": {"a": "b',  # cut off mid-arguments
        '<tool_call>\n{"name": "f", "arguments": {"a": tru}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"a": NaN}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}',
        '<tool_call>\n{"name": "f", "arguments": {}}\ntrailing</tool_call>',
        '<tool_call>{"name": "f", "arguments": {}, }</tool_call>',
        '<tool_call>{"name": "f", "name": "g"}</tool_call>',
    ],
)
def test_qwen_call_failing_after_its_start_becomes_content(text: str) -> None:
    events, calls = one_shot_equals_every_chunking(QwenFormat, text)
    assert calls == []
    assert events[0] == ("start", 0, "f")
    assert content_of((events, calls)) == text  # no text is lost


def test_qwen_failed_call_then_good_call() -> None:
    good = qwen_call("g", {"z": 1})
    bad = '<tool_call>{"name": "f", "arguments": {"a": }}</tool_call>'
    events, calls = one_shot_equals_every_chunking(QwenFormat, f"{bad}\n{good}")
    assert calls == [("g", '{"z": 1}')]
    assert content_of((events, calls)) == bad
    assert ("start", 1, "g") in events  # the failed call keeps index 0

    text = f"<tool_call>oops</tool_call>\n{good}"
    events, calls = one_shot_equals_every_chunking(QwenFormat, text)
    assert calls == [("g", '{"z": 1}')] and ("start", 0, "g") in events
    assert content_of((events, calls)) == "<tool_call>oops</tool_call>"


@pytest.mark.parametrize("tail", ["", "\n", "\n</tool", "\n</tool_call"])
def test_qwen_closed_object_without_end_tag_at_end_of_stream(tail: str) -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}' + tail
    assert one_shot_equals_every_chunking(QwenFormat, text) == (
        [("start", 0, "f"), ("args", 0, '{"a": 1}')],
        [("f", '{"a": 1}')],
    )


def test_qwen_streams_name_and_arguments_as_soon_as_decided() -> None:
    parser = QwenFormat()
    assert parser.feed("Hello <tool") == [ContentDelta("Hello")]
    assert parser.feed("box") == [ContentDelta(" <toolbox")]
    assert parser.feed("\n") == []  # might precede a call
    assert parser.feed('<tool_call>\n{"name": "get_') == []
    assert [type(e) for e in parser.feed('weather", "argu')] == [ToolCallStart]
    assert parser.feed('ments": {"ci') == [ToolCallArgs(0, '{"ci')]
    events = parser.feed('ty": "Par')
    assert [type(e) for e in events] == [ToolCallArgs]  # streamed without waiting
    rest = parser.feed('is"}}\n</tool_call>') + parser.finish()
    assert [type(e) for e in rest] == [ToolCallArgs]
    assert parser.calls[0].arguments == '{"city": "Paris"}'
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_qwen_first_feed_emits_start_before_arguments() -> None:
    parser = QwenFormat()
    events = parser.feed('<tool_call>{"name": "f", "arguments": {"a": 1')
    assert isinstance(events[0], ToolCallStart) and events[0].name == "f"
    assert "".join(e.text for e in events[1:]) == '{"a": 1'


# --- constrained generation ---------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
def test_constrained_calls_follow_names_and_schemas(engine, tokenizer, parallel: bool) -> None:
    names = ["get_weather", "get_time"]
    constraint = engine.grammar.tool_calls(TOOLS, names, QwenFormat, parallel)
    counts = []
    for text, finish in generate(engine, tokenizer, constraint, SEEDS):
        assert finish == "stop", text
        calls = qwen_calls(text)
        counts.append(len(calls))
        for call in calls:
            assert list(call) == ["name", "arguments"] and call["name"] in names
            validate(call["arguments"], TOOL_SCHEMAS[call["name"]])
        # The format's own parser reads back exactly those calls, and nothing else.
        events, parsed = run(QwenFormat, [text])
        assert [(n, json.loads(a)) for n, a in parsed] == [
            (c["name"], c["arguments"]) for c in calls
        ]
        assert content_of((events, parsed)) == ""
    assert counts == [1] * len(SEEDS) if not parallel else max(counts) <= 4
    named = engine.grammar.tool_calls(TOOLS, ["get_time"], QwenFormat, False)
    ((text, _),) = generate(engine, tokenizer, named, [0])
    assert text == '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


# --- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (CHATML_TEMPLATE, True),
        ('<tool_call>\n{"name": "{{ n }}", "arguments": {{ a }}}', True),
        ("<tool_call>{{ call | tojson }}</tool_call>", True),
        ("<tool_call>\n<function={{ tc.name }}>\n<parameter=x>", False),  # Qwen3-Coder's XML
        ("{% for m in messages %}{{ m.content }}{% endfor %}", False),
    ],
)
def test_detect(template: str, expected: bool) -> None:
    assert QwenFormat.detect(template, ()) is expected
