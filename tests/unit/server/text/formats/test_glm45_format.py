"""Tests for server/text/formats/glm45.py: parsing GLM-4.5's format and its constraint grammar."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import AddedToken

from moeserve.server.engine.grammar import GrammarCompiler
from moeserve.server.text.formats import ContentDelta, ToolCallArgs
from moeserve.server.text.formats.glm45 import Glm45Format
from moeserve.server.text.tokenizer import Tokenizer
from tests.helpers import validate
from tests.unit.server.text.formats.helpers import (
    SEEDS,
    TOOLS,
    WEATHER,
    content_of,
    generate,
    one_shot_equals_every_chunking,
    run,
)


def glm_call(name: str, args: dict) -> str:
    """Write a call as GLM-4.5's template does: strings raw, other values as JSON."""
    pairs = "".join(
        f"<arg_key>{k}</arg_key>\n<arg_value>"
        f"{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</arg_value>\n"
        for k, v in args.items()
    )
    return f"<tool_call>{name}\n{pairs}</tool_call>"


GLM_ARGS = {
    "query": "moe servers",
    "limit": 5,
    "ratio": -0.5,
    "exact": True,
    "cursor": None,
    "filters": {"lang": ["en", "fr"], "x": {"y": "}"}},
    "tags": ["a", 1],
    "multiline": "line1\nline2 {not json",
    "unicode": "你好 🙂",
    "empty": "",
    "spaced": "  padded  ",
}


def test_glm_values_of_every_json_type() -> None:
    text = glm_call("search", GLM_ARGS)
    events, calls = one_shot_equals_every_chunking(Glm45Format, text)
    assert [(n, json.loads(a)) for n, a in calls] == [("search", GLM_ARGS)]
    assert events[0] == ("start", 0, "search") and len(events) == 2


def test_glm_streams_one_piece_per_pair() -> None:
    parser = Glm45Format()
    assert parser.feed("Sure.\n<tool_call>f") == [ContentDelta("Sure.")]
    (start,) = parser.feed("\n<arg_key>n</arg_key>\n<arg_value>4")
    assert start.name == "f"
    assert parser.feed("2</arg_value>\n") == [ToolCallArgs(0, '{"n": 42')]
    assert parser.feed('<arg_key>s</arg_key><arg_value>"q"</arg_value>') == [
        ToolCallArgs(0, ', "s": "\\"q\\""')  # a JSON string literal is kept as written
    ]
    assert parser.feed("</tool_call>") == [ToolCallArgs(0, "}")]
    assert parser.finish() == []
    assert json.loads(parser.calls[0].arguments) == {"n": 42, "s": '"q"'}


def test_glm_several_calls_and_zero_argument_calls() -> None:
    text = (
        f"Two calls:\n{glm_call('a', {'x': 1})}\n<tool_call>now</tool_call>\n"
        f"{glm_call('b', {})}\nok"
    )
    events, calls = one_shot_equals_every_chunking(Glm45Format, text)
    assert calls == [("a", '{"x": 1}'), ("now", "{}"), ("b", "{}")]
    assert content_of((events, calls)) == "Two calls:\nok"


def test_glm_string_typed_parameters_stay_strings() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {
                    "type": "object",
                    "properties": {"zip": {"type": "string"}, "n": {"type": ["string", "null"]}},
                },
            },
        }
    ]
    text = glm_call("lookup", {"zip": "42", "n": "true", "count": "7"})
    _, calls = run(lambda: Glm45Format(tools), [text])
    assert json.loads(calls[0][1]) == {"zip": "42", "n": "true", "count": 7}
    _, calls = run(Glm45Format, [text])  # without the schema the values look like JSON
    assert json.loads(calls[0][1]) == {"zip": 42, "n": True, "count": 7}


@pytest.mark.parametrize(
    "text",
    [
        "I use <tool_call> tags when calling.",
        "<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
        '<tool_call>{"name": "f"}</tool_call>',
        "<tool_call>f",
    ],
)
def test_glm_malformed_before_the_name_is_all_content(text: str) -> None:
    assert one_shot_equals_every_chunking(Glm45Format, text) == ([("content", text)], [])


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n",
        "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1",
        "<tool_call>f\n<arg_key>a</arg_key> junk <arg_value>1</arg_value></tool_call>",
        "<tool_call>f\nstray text</tool_call>",
        "<tool_call>f\n<arg_key>a<arg_value>1</arg_value></arg_key></tool_call>",
    ],
)
def test_glm_call_failing_after_its_start_becomes_content(text: str) -> None:
    events, calls = one_shot_equals_every_chunking(Glm45Format, text)
    assert calls == [] and events[0] == ("start", 0, "f")
    assert content_of((events, calls)) == text


# --- constrained generation ---------------------------------------------------------------------

GLM_ARG = r"<arg_key>(.*?)</arg_key>\n<arg_value>(.*?)</arg_value>\n"
GLM_CALL = re.compile(rf"<tool_call>(\w+)\n((?:{GLM_ARG})*)</tool_call>", re.S)


def test_constrained_calls_follow_names_and_schemas(engine, tokenizer) -> None:
    constraint = engine.grammar.tool_calls(TOOLS, ["get_weather"], Glm45Format, False)
    for text, finish in generate(engine, tokenizer, constraint, SEEDS):
        assert finish == "stop", text
        match = GLM_CALL.fullmatch(text)
        assert match and match[1] == "get_weather", text
        args = {}
        for key, raw in re.findall(GLM_ARG, match[2], re.S):
            kind = WEATHER["properties"][key]["type"]
            args[key] = raw if kind == "string" else json.loads(raw)  # strings are written raw
        validate(args, WEATHER)
        # The format's own parser, given the schema, reads back the same arguments.
        _, calls = run(lambda: Glm45Format(TOOLS), [text])
        assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", args)]


def test_markers_that_are_special_tokens_are_used_as_tokens(tokenizer) -> None:
    backend = tokenizer.backend.from_str(tokenizer.backend.to_str())
    markers = list(Glm45Format.MARKERS)
    backend.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in markers])
    special = Tokenizer(backend, eos_token="<|im_end|>")
    compiler = GrammarCompiler(special)
    constraint = compiler.tool_calls(TOOLS, ["get_weather"], Glm45Format, False)
    ids = {m: backend.token_to_id(m) for m in markers}

    def tokens(*parts: str) -> list[int]:
        return [t for p in parts for t in ([ids[p]] if p in ids else special.encode(p))]

    def pair(key: str, value: str) -> list[str]:
        return ["<arg_key>", key, "</arg_key>", "\n", "<arg_value>", value, "</arg_value>", "\n"]

    good = tokens("<tool_call>", "get_weather\n", *pair("city", "Paris <b>"), *pair("unit", "f"))
    good += tokens("</tool_call>")
    matcher = compiler.matcher(constraint)
    assert all(matcher.consume(t) for t in good) and matcher.is_done
    spelled = compiler.matcher(constraint)
    assert not spelled.consume(special.encode("<")[0])  # the marker spelled out
    assert "tool_calls constraint failed" in spelled.error


# --- detection ----------------------------------------------------------------------------------

GLM_LIKE_TEMPLATE = (
    "{% for tc in m.tool_calls %}<tool_call>{{ tc.name }}\n{% for k, v in tc.arguments.items() %}"
    "<arg_key>{{ k }}</arg_key>\n<arg_value>{{ v }}</arg_value>\n{% endfor %}</tool_call>"
    "{% endfor %}"
)


def test_detect() -> None:
    assert Glm45Format.detect(GLM_LIKE_TEMPLATE, ())
    assert not Glm45Format.detect('<tool_call>{"name": 1, "arguments": {}}</tool_call>', ())
