"""Tests for server/text/formats/harmony.py: gpt-oss's channelled messages and their grammar."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import AddedToken

from moeserve.server.engine.grammar import GrammarCompiler
from moeserve.server.text.formats import ContentDelta, ReasoningDelta, ToolCallArgs
from moeserve.server.text.formats.harmony import HarmonyFormat
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


def harmony(tools: list | None = TOOLS):
    return lambda: HarmonyFormat(tools)


def call_message(name: str, args: str, start: bool = True, end: str = "<|call|>") -> str:
    """A call as gpt-oss writes it: channel first, `<|constrain|>json`."""
    head = "<|start|>assistant" if start else ""
    return (
        f"{head}<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{args}{end}"
    )


ANALYSIS = "<|channel|>analysis<|message|>The user asks <b>weather</b>; call it.<|end|>"


def test_reasoning_then_answer() -> None:
    text = f"{ANALYSIS}<|start|>assistant<|channel|>final<|message|>Sunny, 21C {{ok}}."
    events, calls = one_shot_equals_every_chunking(harmony(None), text)
    assert events == [
        ("reasoning", "The user asks <b>weather</b>; call it."),
        ("content", "Sunny, 21C {ok}."),
    ]
    assert calls == []


def test_reasoning_then_call_ended_by_eos() -> None:
    # <|call|> is EOS (never in the text), so the stream simply ends after the arguments.
    args = '{"city":"Paris","unit":"c"}'
    text = ANALYSIS + call_message("get_weather", args, end="")
    events, calls = one_shot_equals_every_chunking(harmony(), text, pairs=True)
    assert events == [
        ("reasoning", "The user asks <b>weather</b>; call it."),
        ("start", 0, "get_weather"),
        ("args", 0, args),
    ]
    assert calls == [("get_weather", args)]


def test_recipient_before_channel_and_whitespace_around_arguments() -> None:
    # The spelling the template writes for earlier calls, here right after the prompt's header.
    text = (
        ' to=functions.get_time<|channel|>commentary json<|message|> \n{ "a" : [1, 2] }\n<|call|>'
    )
    _, calls = one_shot_equals_every_chunking(harmony(), text)
    assert calls == [("get_time", '{ "a" : [1, 2] }')]


def test_calls_without_arguments_and_several_calls() -> None:
    text = (
        "<|channel|>commentary<|message|>Let me check both.<|end|>"
        + call_message("get_time", "", end="<|call|>")
        + call_message("get_weather", '{"city": "Oslo"}')
        + "<|start|>assistant<|channel|>final<|message|>Done."
    )
    events, calls = one_shot_equals_every_chunking(harmony(), text)
    assert calls == [("get_time", "{}"), ("get_weather", '{"city": "Oslo"}')]
    assert content_of((events, calls)) == "Let me check both.Done."
    assert [e[:2] for e in events if e[0] == "start"] == [("start", 0), ("start", 1)]


def test_a_message_left_unclosed_ends_at_the_next_start() -> None:
    text = "<|channel|>analysis<|message|>hmm<|start|>assistant<|channel|>final<|message|>ok<|end|>"
    events, _ = one_shot_equals_every_chunking(harmony(None), text)
    assert events == [("reasoning", "hmm"), ("content", "ok")]


def test_text_outside_messages_is_content() -> None:
    text = "Plain answer, no channels. <|channel|>final<|message|>then final"
    events, _ = one_shot_equals_every_chunking(harmony(None), text)
    assert events == [("content", "Plain answer, no channels. then final")]


@pytest.mark.parametrize(
    "bad",
    [
        call_message("get_weather", '{"city": "Paris"', end=""),  # the stream cut the object
        call_message("get_weather", "[1, 2]"),  # not an object
        call_message("get_weather", '{"x": NaN}'),  # not JSON
    ],
)
def test_malformed_call_becomes_content_with_all_its_text(bad: str) -> None:
    events, calls = one_shot_equals_every_chunking(harmony(), ANALYSIS + bad)
    assert calls == [] and ("start", 0, "get_weather") in events
    assert content_of((events, calls)) == bad


def test_nameless_recipient_and_unended_header_are_content() -> None:
    bad = "<|start|>assistant<|channel|>commentary to=functions. json<|message|>{}<|call|>"
    events, calls = one_shot_equals_every_chunking(harmony(), bad)
    assert calls == [] and content_of((events, calls)) == bad
    unended = "<|channel|>commentary to=functions.get_time json"
    assert one_shot_equals_every_chunking(harmony(), unended) == ([("content", unended)], [])


def test_a_broken_header_is_content_and_parsing_resumes() -> None:
    text = "<|channel|>final<|end|><|start|>assistant<|channel|>final<|message|>ok"
    events, _ = one_shot_equals_every_chunking(harmony(), text)
    assert events == [("content", "<|channel|>final<|end|>ok")]


def test_without_tools_an_addressed_message_is_text() -> None:
    call = call_message("get_weather", '{"city": "Paris"}')
    events, calls = one_shot_equals_every_chunking(harmony(None), ANALYSIS + call)
    assert calls == [] and events[1] == ("content", call)


def test_another_roles_message_is_text() -> None:
    # A model run past its <|call|> (an old generation config) may invent the tool's answer.
    answer = "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>21C<|end|>"
    text = call_message("get_weather", '{"city": "Rome"}') + answer
    events, calls = one_shot_equals_every_chunking(harmony(), text)
    assert calls == [("get_weather", '{"city": "Rome"}')]
    assert content_of((events, calls)) == answer


def test_streams_reasoning_and_arguments_as_they_come() -> None:
    parser = HarmonyFormat(TOOLS)
    assert parser.feed("<|channel|>analysis<|message|>Thin") == [ReasoningDelta("Thin")]
    assert parser.feed("king<|en") == [ReasoningDelta("king")]
    assert parser.feed("d|><|start|>assistant<|channel|>commentary to=functions.") == []
    (start,) = parser.feed("get_time <|constrain|>json<|message|>")
    assert start.name == "get_time"
    assert parser.feed('{"a": 1 ') == [ToolCallArgs(0, '{"a": 1')]  # trailing space held
    assert parser.feed(" }") == [ToolCallArgs(0, "  }")]
    assert parser.finish() == []
    assert parser.calls[0].arguments == '{"a": 1  }'
    parser = HarmonyFormat()
    assert parser.feed("<|channel|>final<|message|>Hi <|") == [ContentDelta("Hi ")]


# --- constrained generation ---------------------------------------------------------------------

CALL = re.compile(
    r"<\|channel\|>commentary to=functions\.(\w+) <\|constrain\|>json<\|message\|>(.*)", re.S
)


@pytest.mark.parametrize("names", [["get_weather"], ["get_weather", "get_time"]])
def test_constrained_calls_follow_names_and_schemas(engine, tokenizer, names: list[str]) -> None:
    constraint = engine.grammar.tool_calls(TOOLS, names, HarmonyFormat, parallel=True)
    for text, finish in generate(engine, tokenizer, constraint, SEEDS):
        assert finish == "stop", text
        match = CALL.fullmatch(text)  # one call message, nothing after it
        assert match and match[1] in names, text
        validate(json.loads(match[2]), TOOL_SCHEMAS[match[1]])
        _, calls = run(harmony(), [text])
        assert [(n, json.loads(a)) for n, a in calls] == [(match[1], json.loads(match[2]))]


def test_markers_that_are_special_tokens_are_used_as_tokens(tokenizer) -> None:
    backend = tokenizer.backend.from_str(tokenizer.backend.to_str())
    markers = list(HarmonyFormat.MARKERS)
    backend.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in markers])
    special = Tokenizer(backend, eos_token="<|im_end|>")
    special.add_eos_tokens(HarmonyFormat.TURN_END)
    compiler = GrammarCompiler(special)
    constraint = compiler.tool_calls(TOOLS, ["get_weather"], HarmonyFormat, False)
    ids = {m: backend.token_to_id(m) for m in markers}

    def tokens(*parts: str) -> list[int]:
        return [t for p in parts for t in ([ids[p]] if p in ids else special.encode(p))]

    good = tokens("<|channel|>", "commentary to=functions.get_weather ", "<|constrain|>", "json")
    good += tokens("<|message|>", '{"city": "Paris", "unit": "c"}')
    matcher = compiler.matcher(constraint)
    assert all(matcher.consume(t) for t in good) and matcher.is_done
    assert matcher.consume(ids["<|call|>"])  # the turn's end is an EOS the grammar allows
    spelled = compiler.matcher(constraint)
    assert not spelled.consume(special.encode("<")[0])
    assert "tool_calls constraint failed" in spelled.error


def test_eos_tokens_gain_the_turn_ends_once(tokenizer) -> None:
    backend = tokenizer.backend.from_str(tokenizer.backend.to_str())
    backend.add_special_tokens([AddedToken(m, special=True) for m in HarmonyFormat.MARKERS])
    tok = Tokenizer(backend, eos_token="<|return|>")
    before = set(tok.eos_token_ids)
    tok.add_eos_tokens(HarmonyFormat.TURN_END)
    tok.add_eos_tokens(["<|call|>", "<|not-a-token|>"])
    assert tok.eos_token_ids == before | {backend.token_to_id("<|call|>")}


def test_detect() -> None:
    assert HarmonyFormat.detect("{{ '<|start|>assistant<|channel|>final<|message|>' }}", ())
    assert not HarmonyFormat.detect("<tool_call>{{ tc | tojson }}</tool_call>", ())
