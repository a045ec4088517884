"""Tests for server/text/formats/deepseek_v31.py: DeepSeek-V3.1's call sections and grammar."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import AddedToken

from moeserve.server.engine.grammar import GrammarCompiler
from moeserve.server.text.formats import MAX_PARALLEL_CALLS, ContentDelta, ToolCallArgs
from moeserve.server.text.formats.deepseek_v31 import DeepSeekV31Format
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

OPEN, CLOSE = DeepSeekV31Format.SECTION
BEGIN, SEP, END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"


def call(name: str, args: str) -> str:
    return f"{BEGIN}{name}{SEP}{args}{END}"


def section(*calls: str) -> str:
    return OPEN + "".join(calls) + CLOSE


def test_one_call_in_every_chunking() -> None:
    text = "Let me check." + section(call("get_weather", '{"city": "Paris", "unit": "c"}'))
    events, calls = one_shot_equals_every_chunking(DeepSeekV31Format, text, pairs=True)
    assert events[0] == ("content", "Let me check.")
    assert calls == [("get_weather", '{"city": "Paris", "unit": "c"}')]


def test_chained_calls_and_text_after_the_section() -> None:
    args = '{"q": "a <b> {c} \\" d", "n": [1, {"x": null}]}'
    text = section(call("search", args), call("get_time", ""), call("f", " {}\n")) + "\nDone"
    events, calls = one_shot_equals_every_chunking(DeepSeekV31Format, text)
    assert calls == [("search", args), ("get_time", "{}"), ("f", "{}")]
    assert content_of((events, calls)) == "\nDone"
    assert [e for e in events if e[0] == "start"] == [
        ("start", 0, "search"),
        ("start", 1, "get_time"),
        ("start", 2, "f"),
    ]


def test_arguments_stream_as_generated() -> None:
    parser = DeepSeekV31Format()
    assert parser.feed("Hi " + OPEN) == [ContentDelta("Hi")]  # the open and " " are held
    start, args = parser.feed(BEGIN + "get_weather" + SEP + ' {"city": ')
    assert start.name == "get_weather" and args == ToolCallArgs(0, '{"city":')
    assert parser.feed('"Oslo"} <｜tool▁call') == [ToolCallArgs(0, ' "Oslo"}')]
    assert parser.feed("▁end｜>" + CLOSE) == []
    assert parser.finish() == []
    assert parser.calls[0].arguments == '{"city": "Oslo"}'


@pytest.mark.parametrize(
    "bad",
    [
        section(call("get weather", "{}")),  # not one word
        OPEN + BEGIN + "get_weather{}" + END + CLOSE,  # no separator
        section(call("f", "[1]")),  # not an object
        section(call("f", '{"s": "<｜tool▁call▁end｜>"}')),  # the end marker cuts the JSON
        OPEN + BEGIN + "f" + SEP + '{"a": 1}',  # the stream ended inside the call
        OPEN + "not a call" + CLOSE,
    ],
)
def test_malformed_calls_are_content(bad: str) -> None:
    events, calls = one_shot_equals_every_chunking(DeepSeekV31Format, "Text: " + bad)
    assert calls == []
    assert content_of((events, calls)) == "Text: " + bad


def test_a_good_call_after_a_bad_one_in_the_same_section() -> None:
    text = section(call("f", "{oops}"), call("g", '{"ok": true}'))
    events, calls = one_shot_equals_every_chunking(DeepSeekV31Format, text)
    assert calls == [("g", '{"ok": true}')]
    assert content_of((events, calls)) == OPEN + call("f", "{oops}")


# --- constrained generation ---------------------------------------------------------------------

CALL = re.compile(re.escape(BEGIN) + r"(\w+)" + re.escape(SEP) + r"(.*?)" + re.escape(END), re.S)


def test_constrained_calls_follow_names_and_schemas(engine, tokenizer) -> None:
    names = ["get_weather", "get_time"]
    constraint = engine.grammar.tool_calls(TOOLS, names, DeepSeekV31Format, False)
    for text, finish in generate(engine, tokenizer, constraint, SEEDS):
        assert finish == "stop", text
        assert text.startswith(OPEN) and text.endswith(CLOSE), text
        (found,) = CALL.findall(text)
        assert text == section(call(*found)), text
        validate(json.loads(found[1]), TOOL_SCHEMAS[found[0]])
        _, calls = run(DeepSeekV31Format, [text])
        assert calls == [found]


def special_compiler(tokenizer) -> tuple[GrammarCompiler, Tokenizer, dict[str, int]]:
    """A compiler whose tokenizer has the format's markers as special tokens."""
    backend = tokenizer.backend.from_str(tokenizer.backend.to_str())
    markers = list(DeepSeekV31Format.MARKERS)
    backend.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in markers])
    special = Tokenizer(backend, eos_token="<|im_end|>")
    return GrammarCompiler(special), special, {m: backend.token_to_id(m) for m in markers}


def test_markers_that_are_special_tokens_are_used_as_tokens(tokenizer) -> None:
    compiler, special, ids = special_compiler(tokenizer)
    constraint = compiler.tool_calls(TOOLS, ["get_time"], DeepSeekV31Format, False)
    good = [ids[OPEN], ids[BEGIN], *special.encode("get_time"), ids[SEP]]
    good += [*special.encode("{}"), ids[END], ids[CLOSE]]
    matcher = compiler.matcher(constraint)
    assert all(matcher.consume(t) for t in good) and matcher.is_done
    spelled = compiler.matcher(constraint)
    assert not spelled.consume(special.encode("<")[0])


def test_parallel_calls_chain_up_to_the_limit(tokenizer) -> None:
    # Too long for the demo model's 200 tokens as text, so checked token by token.
    compiler, special, ids = special_compiler(tokenizer)
    one = [ids[BEGIN], *special.encode("get_time"), ids[SEP], *special.encode("{}"), ids[END]]
    for parallel, allowed in ((False, 1), (True, MAX_PARALLEL_CALLS)):
        constraint = compiler.tool_calls(TOOLS, ["get_time"], DeepSeekV31Format, parallel)
        matcher = compiler.matcher(constraint)
        assert matcher.consume(ids[OPEN])
        assert all(matcher.consume(t) for t in one * allowed)
        assert not matcher.consume(ids[BEGIN])  # one call more than allowed
        matcher = compiler.matcher(constraint)
        assert all(matcher.consume(t) for t in [ids[OPEN], *one * allowed, ids[CLOSE]])
        assert matcher.is_done


def test_detect() -> None:
    v31 = "{{'<｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + args}}"
    v3 = "{{'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + name + '\\n```json\\n'}}"
    assert DeepSeekV31Format.detect(v31, ()) and not DeepSeekV31Format.detect(v3, ())
