"""Tests for server/text/formats/kimi_k2.py: Kimi-K2's call sections, its ids and its grammar."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import AddedToken

from moeserve.server.engine.grammar import GrammarCompiler
from moeserve.server.text.formats import (
    MAX_PARALLEL_CALLS,
    ContentDelta,
    ToolCallArgs,
    ToolCallStart,
)
from moeserve.server.text.formats.kimi_k2 import KimiK2Format
from moeserve.server.text.tokenizer import Tokenizer
from tests.helpers import validate
from tests.unit.server.text.formats.helpers import (
    SEEDS,
    TOOL_SCHEMAS,
    TOOLS,
    Result,
    chunkings,
    content_of,
    generate,
    normalize,
)

OPEN, CLOSE = KimiK2Format.SECTION
BEGIN, ARGS, END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(call_id: str, args: str) -> str:
    return f"{BEGIN}{call_id}{ARGS}{args}{END}"


def section(*calls: str) -> str:
    return OPEN + "".join(calls) + CLOSE


def run(chunks: list[str]) -> tuple[Result, list[str]]:
    """Parse a stream; (normalized events and calls, the ids of the calls).

    Kimi's ids are the model's own (``functions.NAME:IDX``), not the `call_<hex>` ids the
    shared `normalize` checks, so they are checked here and handed to it as stand-ins.
    """
    parser = KimiK2Format()
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    for start in starts:
        assert re.fullmatch(r"(functions\.)?" + re.escape(start.name) + r":\d+", start.id)
    assert len({s.id for s in starts}) == len(starts)  # unique within the response
    stand_in = {s.id: f"call_{s.index:024x}" for s in starts}
    for start in starts:
        start.id = stand_in[start.id]
    calls = parser.calls
    ids = [c.id for c in calls]
    for c in calls:
        c.id = stand_in[c.id]
    return normalize(events, calls), ids


def every_chunking(text: str, pairs: bool = False) -> tuple[Result, list[str]]:
    expected = run([text])
    for chunks in chunkings(text, pairs=pairs):
        assert run(chunks) == expected, chunks
    return expected


def test_one_call_in_every_chunking() -> None:
    text = "Let me check." + section(call("functions.get_weather:0", '{"city": "Paris"}'))
    (events, calls), ids = every_chunking(text, pairs=True)
    assert events[0] == ("content", "Let me check.")
    assert calls == [("get_weather", '{"city": "Paris"}')]
    assert ids == ["functions.get_weather:0"]


def test_chained_calls_whitespace_and_text_after_the_section() -> None:
    args = '{"q": "a <b> {c} \\" d", "n": [1, {"x": null}]}'
    calls_text = [
        call("functions.search:3", args),
        call("\n functions.get_time:4 \n", ""),  # whitespace around the id and no arguments
        call("functions.f:5", " {}\n"),
    ]
    text = "Two.\n" + OPEN + "\n" + "\n".join(calls_text) + "\n" + CLOSE + "\nDone"
    (events, calls), ids = every_chunking(text)
    assert calls == [("search", args), ("get_time", "{}"), ("f", "{}")]
    assert ids == ["functions.search:3", "functions.get_time:4", "functions.f:5"]
    assert content_of((events, calls)) == "Two.\nDone"
    assert [e for e in events if e[0] == "start"] == [
        ("start", 0, "search"),
        ("start", 1, "get_time"),
        ("start", 2, "f"),
    ]


def test_ids_are_the_models_own_and_unique() -> None:
    text = section(
        call("functions.get_weather:7", '{"city": "A"}'),
        call("functions.get_weather:7", '{"city": "B"}'),  # repeated: the next free index
        call("get_weather:8", "{}"),  # no prefix: kept as written
        call("functions.mcp.files.read:0", "{}"),  # a dotted name keeps its dots
    )
    (_, calls), ids = every_chunking(text)
    assert ids == [
        "functions.get_weather:7",
        "functions.get_weather:8",
        "get_weather:8",
        "functions.mcp.files.read:0",
    ]
    assert [name for name, _ in calls] == ["get_weather"] * 3 + ["mcp.files.read"]


def test_arguments_stream_as_generated() -> None:
    parser = KimiK2Format()
    assert parser.feed("Hi " + OPEN) == [ContentDelta("Hi")]  # the open and " " are held
    assert parser.feed(BEGIN + "functions.get_weather:") == []  # the id is not complete
    start, args = parser.feed("0" + ARGS + ' {"city": ')
    assert start == ToolCallStart(0, "functions.get_weather:0", "get_weather")
    assert args == ToolCallArgs(0, '{"city":')
    assert parser.feed('"Oslo"} <|tool_call') == [ToolCallArgs(0, ' "Oslo"}')]
    assert parser.feed("_end|>" + CLOSE) == []
    assert parser.finish() == []
    assert parser.calls[0].arguments == '{"city": "Oslo"}'
    assert parser.calls[0].id == "functions.get_weather:0"


@pytest.mark.parametrize(
    "bad",
    [
        section(call("functions.get_weather", "{}")),  # no :IDX
        section(call("functions.get weather:0", "{}")),  # not one word
        section(call("functions.:0", "{}")),  # no name
        OPEN + BEGIN + "functions.f:0{}" + END + CLOSE,  # no argument marker
        section(call("functions.f:0", "[1]")),  # not an object
        section(call("functions.f:0", '{"s": "<|tool_call_end|>"}')),  # the end cuts the JSON
        section(call("functions.f:0", '{"a": ' + BEGIN)),  # a call begins inside the arguments
        OPEN + BEGIN + "functions.f:0" + ARGS + '{"a": 1}',  # the stream ended inside the call
        OPEN + "not a call" + CLOSE,
    ],
)
def test_malformed_calls_are_content(bad: str) -> None:
    (events, calls), _ = every_chunking("Text: " + bad)
    assert calls == []
    assert content_of((events, calls)) == "Text: " + bad


def test_a_good_call_after_a_bad_one_in_the_same_section() -> None:
    text = section(call("functions.f:0", "{oops}"), call("functions.g:1", '{"ok": true}'))
    (events, calls), ids = every_chunking(text)
    assert calls == [("g", '{"ok": true}')] and ids == ["functions.g:1"]
    assert content_of((events, calls)) == OPEN + call("functions.f:0", "{oops}")


# --- constrained generation ---------------------------------------------------------------------

CALL = re.compile(
    re.escape(BEGIN) + r"functions\.(\w+):(\d+)" + re.escape(ARGS) + r"(.*?)" + re.escape(END),
    re.S,
)


def test_constrained_calls_follow_names_and_schemas(engine, tokenizer) -> None:
    names = ["get_weather", "get_time"]
    constraint = engine.grammar.tool_calls(TOOLS, names, KimiK2Format, False)
    for text, finish in generate(engine, tokenizer, constraint, SEEDS):
        assert finish == "stop", text
        ((name, index, args),) = CALL.findall(text)
        assert text == section(call(f"functions.{name}:{index}", args)), text
        assert name in names and 1 <= len(index) <= 4
        validate(json.loads(args), TOOL_SCHEMAS[name])
        (_, calls), ids = run([text])
        assert calls == [(name, args)] and ids == [f"functions.{name}:{index}"]
    named = engine.grammar.tool_calls(TOOLS, ["get_time"], KimiK2Format, False)
    for text, _ in generate(engine, tokenizer, named, [0, 1]):
        assert CALL.fullmatch(text.removeprefix(OPEN).removesuffix(CLOSE))[1] == "get_time"


def special_compiler(tokenizer) -> tuple[GrammarCompiler, Tokenizer, dict[str, int]]:
    """A compiler whose tokenizer has the format's markers as special tokens (as Kimi's has)."""
    backend = tokenizer.backend.from_str(tokenizer.backend.to_str())
    markers = list(KimiK2Format.MARKERS)
    backend.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in markers])
    special = Tokenizer(backend, eos_token="<|im_end|>")
    return GrammarCompiler(special), special, {m: backend.token_to_id(m) for m in markers}


def test_markers_that_are_special_tokens_are_used_as_tokens(tokenizer) -> None:
    compiler, special, ids = special_compiler(tokenizer)
    constraint = compiler.tool_calls(TOOLS, ["get_time"], KimiK2Format, False)
    good = [ids[OPEN], ids[BEGIN], *special.encode("functions.get_time:12"), ids[ARGS]]
    good += [*special.encode("{}"), ids[END], ids[CLOSE]]
    matcher = compiler.matcher(constraint)
    assert all(matcher.consume(t) for t in good) and matcher.is_done
    spelled = compiler.matcher(constraint)
    assert not spelled.consume(special.encode("<")[0])
    wrong_name = compiler.matcher(constraint)
    assert wrong_name.consume(ids[OPEN]) and wrong_name.consume(ids[BEGIN])
    assert not all(wrong_name.consume(t) for t in special.encode("functions.get_weather:0"))


def test_parallel_calls_chain_up_to_the_limit(tokenizer) -> None:
    compiler, special, ids = special_compiler(tokenizer)
    one = [ids[BEGIN], *special.encode("functions.get_time:0"), ids[ARGS]]
    one += [*special.encode("{}"), ids[END]]
    for parallel, allowed in ((False, 1), (True, MAX_PARALLEL_CALLS)):
        constraint = compiler.tool_calls(TOOLS, ["get_time"], KimiK2Format, parallel)
        matcher = compiler.matcher(constraint)
        assert matcher.consume(ids[OPEN])
        assert all(matcher.consume(t) for t in one * allowed)
        assert not matcher.consume(ids[BEGIN])  # one call more than allowed
        matcher = compiler.matcher(constraint)
        assert all(matcher.consume(t) for t in [ids[OPEN], *one * allowed, ids[CLOSE]])
        assert matcher.is_done


# --- detection ----------------------------------------------------------------------------------


def test_detect() -> None:
    writes_calls = "<|tool_call_begin|>{{ id }}<|tool_call_argument_begin|>{{ args }}"
    assert KimiK2Format.detect(writes_calls, ())
    # Kimi-K2-Instruct's first template declared tools but rendered no calls: the vocabulary
    # tells it is Kimi's.
    declares = "<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>"
    assert KimiK2Format.detect(declares, {"<|tool_calls_section_begin|>": 163595})
    assert not KimiK2Format.detect(declares, ())
    assert not KimiK2Format.detect("<tool_call>{{ tc | tojson }}</tool_call>", ())
