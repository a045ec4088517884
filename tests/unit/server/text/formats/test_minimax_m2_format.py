"""Tests for server/text/formats/minimax_m2.py: MiniMax-M2's <invoke> blocks and their grammar."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import AddedToken

from moeserve.server.engine.grammar import GrammarCompiler
from moeserve.server.text.formats import MAX_PARALLEL_CALLS, ContentDelta, ToolCallArgs
from moeserve.server.text.formats.minimax_m2 import MinimaxM2Format
from moeserve.server.text.tokenizer import Tokenizer
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

OPEN, CLOSE = "<minimax:tool_call>", "</minimax:tool_call>"

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
        "ref": {"$ref": "#/$defs/s"},
    },
    "$defs": {"s": {"type": "string"}},
}
TYPED_TOOLS = [{"type": "function", "function": {"name": "edit", "parameters": TYPED}}]


def invoke(name: str, args: dict) -> str:
    """One call as MiniMax-M2's template writes it: strings raw, other values as JSON."""
    params = "".join(
        f'<parameter name="{k}">'
        f"{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</parameter>\n"
        for k, v in args.items()
    )
    return f'<invoke name="{name}">\n{params}</invoke>\n'


def block(*invokes: str) -> str:
    return f"\n{OPEN}\n{''.join(invokes)}{CLOSE}"


def typed() -> MinimaxM2Format:
    return MinimaxM2Format(TYPED_TOOLS)


def test_template_written_call_in_every_chunking() -> None:
    text = "Checking." + block(invoke("get_weather", {"city": "Paris", "days": 3}))
    events, calls = one_shot_equals_every_chunking(MinimaxM2Format, text, pairs=True)
    assert events[0] == ("content", "Checking.") and events[1] == ("start", 0, "get_weather")
    assert calls == [("get_weather", '{"city": "Paris", "days": 3}')]


ARGS = {
    "path": "src/a b.py",
    "zip": "01234",
    "count": 7,
    "ratio": -0.5,
    "force": True,
    "opts": {"x": [1, {"y": "}"}]},
    "tags": ["a", 1],
    "note": None,
    "limit": None,
    "ref": "12",
}


def test_values_take_the_schema_types_round_trip() -> None:
    text = block(invoke("edit", ARGS))
    _, calls = one_shot_equals_every_chunking(typed, text)
    assert [(n, json.loads(a)) for n, a in calls] == [("edit", ARGS)]
    # String-typed parameters stay strings even when they look like JSON; others take JSON
    # only of their own types.
    looks_like_json = {"path": "[1]", "zip": "42", "note": "42", "ref": "true", "count": "x"}
    _, calls = run(typed, [block(invoke("edit", looks_like_json))])
    assert json.loads(calls[0][1]) == looks_like_json
    wrong_types = {"count": "1.5", "force": "1", "opts": "[1]", "tags": "{}", "limit": "true"}
    _, calls = run(typed, [block(invoke("edit", wrong_types))])
    assert json.loads(calls[0][1]) == wrong_types
    _, calls = run(typed, [block(invoke("edit", {"ratio": "2", "note": "null"}))])
    assert json.loads(calls[0][1]) == {"ratio": 2, "note": None}


def test_without_schema_json_looking_values_are_json_and_text_is_exact() -> None:
    raw = {"a": "42", "b": "true", "c": '"quoted"', "d": "  padded \n", "e": "<b>&</b>", "f": ""}
    _, calls = run(MinimaxM2Format, [block(invoke("f", raw))])
    assert json.loads(calls[0][1]) == {
        "a": 42,
        "b": True,
        "c": '"quoted"',  # a JSON string literal is kept as written
        "d": "  padded \n",
        "e": "<b>&</b>",
        "f": "",
    }


def test_several_invokes_several_blocks_and_calls_without_parameters() -> None:
    first = block(invoke("a", {"x": 1}), invoke("now", {}))
    text = f"Two blocks:{first}\nbetween{block(invoke('b', {'y': 'z'}))}\nok"
    events, calls = one_shot_equals_every_chunking(MinimaxM2Format, text)
    assert calls == [("a", '{"x": 1}'), ("now", "{}"), ("b", '{"y": "z"}')]
    assert content_of((events, calls)) == "Two blocks:\nbetween\nok"
    assert [e for e in events if e[0] == "start"] == [
        ("start", 0, "a"),
        ("start", 1, "now"),
        ("start", 2, "b"),
    ]


def test_streams_one_piece_per_parameter() -> None:
    parser = MinimaxM2Format()
    assert parser.feed("Sure.\n<minimax:tool") == [ContentDelta("Sure.")]
    (start,) = parser.feed('_call>\n<invoke name="f">\n<parameter name="n">4')
    assert start.name == "f" and start.index == 0  # announced with the name
    assert parser.feed("2</parameter>\n") == [ToolCallArgs(0, '{"n": 42')]
    assert parser.feed("<parameter name='s'>x</parameter>\n</invoke>") == [
        ToolCallArgs(0, ', "s": "x"'),
        ToolCallArgs(0, "}"),
    ]
    assert parser.feed("\n</minimax:tool_call>") == [] and parser.finish() == []
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("f", {"n": 42, "s": "x"})]


@pytest.mark.parametrize("tail", ["", "\n", "\n</minimax:to"])
def test_finished_invoke_without_block_end_at_end_of_stream(tail: str) -> None:
    text = f"{OPEN}\n{invoke('f', {'a': 1}).rstrip()}{tail}"
    events, calls = one_shot_equals_every_chunking(MinimaxM2Format, text)
    assert calls == [("f", '{"a": 1}')] and content_of((events, calls)) == ""


@pytest.mark.parametrize(
    "text",
    [
        'I write <invoke name="f">\n</invoke> in XML.',  # outside a block: not a call
        f'{OPEN} text <invoke name="f">\n</invoke>\n{CLOSE}',  # text between
        f"{OPEN}\n</minimax:tool_call>",  # an empty block
        f'{OPEN}\n<invoke name="f" x>\n</invoke>{CLOSE}',  # no '>' after the name
        f"{OPEN}\n<invoke name=>\n</invoke>{CLOSE}",  # an empty name
        f'{OPEN}\n<invoke name="f',  # the stream ended in the name
    ],
)
def test_malformed_before_the_name_is_all_content(text: str) -> None:
    assert one_shot_equals_every_chunking(MinimaxM2Format, text) == ([("content", text)], [])


@pytest.mark.parametrize(
    "text",
    [
        f'{OPEN}\n<invoke name="f">\n<parameter name="a">1</parameter>\n',  # ended in the call
        f'{OPEN}\n<invoke name="f">\n<parameter name="a">1',  # ended in a value
        f'{OPEN}\n<invoke name="f">\n<parameter name="a">1\n<parameter name="b">2</parameter>',
        f'{OPEN}\n<invoke name="f">\n<parameter name="a">1</parameter>\n'
        f'<parameter name="a">2</parameter>\n</invoke>\n{CLOSE}',  # a parameter given twice
        f'{OPEN}\n<invoke name="f">\nstray</invoke>\n{CLOSE}',
        f'{OPEN}\n<invoke name="f">\n</invoke>\nleft open\n{CLOSE}',  # text after </invoke>
    ],
)
def test_call_failing_after_its_start_becomes_content(text: str) -> None:
    events, calls = one_shot_equals_every_chunking(MinimaxM2Format, text)
    assert calls == [] and events[0] == ("start", 0, "f")
    assert content_of((events, calls)) == text


def test_a_bad_invoke_ends_its_block_for_calls() -> None:
    # The good invoke before it is a call; the rest of the block is content.
    good, later = invoke("g", {"ok": True}), invoke("h", {})
    bad = '<invoke name="f">\nstray</invoke>\n'
    text = f"{OPEN}\n{good}{bad}{later}{CLOSE}"
    events, calls = one_shot_equals_every_chunking(MinimaxM2Format, text)
    assert calls == [("g", '{"ok": true}')]
    assert content_of((events, calls)) == f"\n{bad}{later}{CLOSE}"


# --- constrained generation ---------------------------------------------------------------------

PARAMS = r'((?:<parameter name="\w+">.*?</parameter>\n)*)'
INVOKE = re.compile(r'<invoke name="(\w+)">\n' + PARAMS + r"</invoke>\n", re.S)
PARAM = re.compile(r'<parameter name="(\w+)">(.*?)</parameter>\n', re.S)


def read_calls(text: str) -> list[tuple[str, dict[str, str]]]:
    """The calls of constrained output, read independently of the parser: exact layout."""
    assert text.startswith(OPEN + "\n") and text.endswith(CLOSE), text
    body, calls, pos = text[len(OPEN) + 1 : -len(CLOSE)], [], 0
    while pos < len(body):
        match = INVOKE.match(body, pos)
        assert match, text
        calls.append((match[1], dict(PARAM.findall(match[2]))))
        pos = match.end()
    return calls


@pytest.mark.parametrize("parallel", [False, True])
def test_constrained_calls_follow_names_and_schemas(engine, tokenizer, parallel: bool) -> None:
    names = ["get_weather", "get_time"]
    constraint = engine.grammar.tool_calls(TOOLS, names, MinimaxM2Format, parallel)
    counts = []
    for text, finish in generate(engine, tokenizer, constraint, SEEDS):
        assert finish == "stop", text
        calls = read_calls(text)
        counts.append(len(calls))
        expected = []
        for name, params in calls:
            props = TOOL_SCHEMAS[name].get("properties", {})
            args = {
                k: v if props[k]["type"] == "string" else json.loads(v) for k, v in params.items()
            }
            validate(args, TOOL_SCHEMAS[name])
            expected.append((name, args))
        # The format's own parser, given the tools, reads back the same calls and nothing else.
        events, parsed = run(lambda: MinimaxM2Format(TOOLS), [text])
        assert [(n, json.loads(a)) for n, a in parsed] == expected
        assert content_of((events, parsed)) == ""
    assert counts == [1] * len(SEEDS) if not parallel else max(counts) <= MAX_PARALLEL_CALLS
    named = engine.grammar.tool_calls(TOOLS, ["get_time"], MinimaxM2Format, False)
    ((text, _),) = generate(engine, tokenizer, named, [0])
    assert text == f'{OPEN}\n<invoke name="get_time">\n</invoke>\n{CLOSE}'


def test_constrained_strings_keep_their_length_bounds(engine, tokenizer) -> None:
    constraint = engine.grammar.tool_calls(TOOLS, ["get_weather"], MinimaxM2Format, False)
    for text, _ in generate(engine, tokenizer, constraint, range(4)):
        ((_, params),) = read_calls(text)
        assert len(params["city"]) <= WEATHER["properties"]["city"]["maxLength"]
        assert params["unit"] in ("c", "f")


def special_compiler(tokenizer) -> tuple[GrammarCompiler, Tokenizer, dict[str, int]]:
    """A compiler whose tokenizer has the block's tags as special tokens."""
    backend = tokenizer.backend.from_str(tokenizer.backend.to_str())
    backend.add_special_tokens(
        [AddedToken(m, special=True, normalized=False) for m in (OPEN, CLOSE)]
    )
    special = Tokenizer(backend, eos_token="<|im_end|>")
    return GrammarCompiler(special), special, {m: backend.token_to_id(m) for m in (OPEN, CLOSE)}


def test_block_tags_that_are_special_tokens_are_used_as_tokens(tokenizer) -> None:
    compiler, special, ids = special_compiler(tokenizer)
    one = special.encode('<invoke name="get_time">\n</invoke>\n')
    for parallel, allowed in ((False, 1), (True, MAX_PARALLEL_CALLS)):
        constraint = compiler.tool_calls(TOOLS, ["get_time"], MinimaxM2Format, parallel)
        matcher = compiler.matcher(constraint)
        assert matcher.consume(ids[OPEN]) and matcher.consume(special.encode("\n")[0])
        assert all(matcher.consume(t) for t in one * allowed)
        assert not matcher.consume(one[0])  # one call more than allowed
        matcher = compiler.matcher(constraint)
        head = [ids[OPEN], *special.encode("\n")]
        assert all(matcher.consume(t) for t in [*head, *one * allowed, ids[CLOSE]])
        assert matcher.is_done
    spelled = compiler.matcher(compiler.tool_calls(TOOLS, ["get_time"], MinimaxM2Format, False))
    assert not spelled.consume(special.encode("<")[0])


# --- detection ----------------------------------------------------------------------------------


def test_detect() -> None:
    assert MinimaxM2Format.detect("{%- set toolcall_begin_token = '<minimax:tool_call>' -%}", ())
    assert not MinimaxM2Format.detect("<tool_call>\n<function=f>\n<parameter=x>", ())
    assert not MinimaxM2Format.detect('<invoke name="f"><parameter name="x">', ())
