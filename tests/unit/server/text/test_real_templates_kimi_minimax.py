"""Kimi-K2's and MiniMax-M2's real chat templates: rendering equals transformers', detection.

The expected prompts in ``tests/fixtures/templates/<model>/rendered.json`` were rendered by
transformers (``render_kimi_minimax.py`` beside them) from the conversations stored with them.
Here moeserve renders each stored request the way the server does: the request body parsed as a
``ChatCompletionRequest``, its messages through ``template_dict`` and
``Tokenizer.apply_chat_template`` (``routes.chat.render_prompt``). Then each template is
detected as its formats, and a call the model writes, parsed by the format and sent back by a
client, renders into the next prompt as the model wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as Backend

from moeserve.server.http.protocol import ChatCompletionRequest
from moeserve.server.http.routes.chat import kept_special_ids, output_config, render_prompt
from moeserve.server.http.routes.chat_output import ChoiceAssembler
from moeserve.server.text.chat_template import load_templates, wants_argument_objects
from moeserve.server.text.formats import detect_reasoning, detect_tool_format, tool_format
from moeserve.server.text.formats.think import ThinkFormat
from moeserve.server.text.tokenizer import Tokenizer

TEMPLATES = Path(__file__).parents[3] / "fixtures" / "templates"
RENDERED = ("kimi_k2_thinking", "kimi_k2_5", "minimax_m2")
KIMI_MARKERS = tuple(tool_format("kimi_k2").MARKERS)
# Stand-in vocabularies (no tokenizer_config.json is at hand, see the PROVENANCE files): the
# markers the templates write, as special tokens, as vLLM's parsers require them in the vocab.
VOCABULARY = {
    "kimi": ("<|im_end|>", "<think>", "</think>", *KIMI_MARKERS),
    "minimax": (
        "]~!b[",
        "[e~[",
        "<think>",
        "</think>",
        "<minimax:tool_call>",
        "</minimax:tool_call>",
    ),
}


def fixture(model: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / model / "rendered.json").read_text(encoding="utf-8"))


def template_of(model: str) -> str:
    return load_templates(TEMPLATES / model, {})["default"]  # chat_template.jinja


def vocabulary(model: str) -> dict[str, int]:
    tokens = VOCABULARY["minimax" if model.startswith("minimax") else "kimi"]
    return {t: i + 1 for i, t in enumerate(tokens)}


def tokenizer_for(model: str) -> Tokenizer:
    """Our tokenizer with the model's template and a stand-in vocabulary of special tokens."""
    specials = fixture(model)["special_tokens"] if model in RENDERED else {}
    vocab = {"<unk>": 0, **vocabulary(model)}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(t, special=True) for t in vocab if t != "<unk>"])
    return Tokenizer(backend, **specials, chat_templates={"default": template_of(model)})


def render(tokenizer: Tokenizer, request: dict[str, Any]) -> str:
    req = ChatCompletionRequest.model_validate({"model": "m", **request})
    runtime = SimpleNamespace(tokenizer=tokenizer, max_model_len=1 << 20, extra={})
    return render_prompt(runtime, req)[1]  # type: ignore[arg-type]


CASES = [(m, c["name"]) for m in RENDERED for c in fixture(m)["cases"]]


@pytest.mark.parametrize(("model", "name"), CASES)
def test_rendering_equals_transformers(model: str, name: str) -> None:
    case = next(c for c in fixture(model)["cases"] if c["name"] == name)
    assert render(tokenizer_for(model), case["request"]) == case["expected"]


def test_kimi_keeps_argument_text_and_minimax_gets_objects() -> None:
    # Kimi's templates test `['arguments'] is string` and write text verbatim; the server must
    # not re-serialize a client's JSON (the fixtures hold unusual spacing to show it).
    for model in ("kimi_k2_thinking", "kimi_k2_5"):
        assert not wants_argument_objects(template_of(model))
        case = fixture(model)["cases"][1]
        assert '{"city":"Rome",  "unit":"f", "days": 2}' in case["expected"]
    # MiniMax-M2's iterates `arguments.items()`: JSON text is decoded for it.
    assert wants_argument_objects(template_of("minimax_m2"))


# --- detection: each real template is read as its formats ---------------------------------------


@pytest.mark.parametrize("model", ["kimi_k2_thinking", "kimi_k2_5", "kimi_k2_instruct"])
def test_kimi_templates_are_kimi_k2(model: str) -> None:
    template = template_of(model)
    assert detect_tool_format(template, None, vocabulary(model)) == "kimi_k2"
    if model == "kimi_k2_instruct":  # the first template renders no calls: the vocabulary tells
        assert detect_tool_format(template, None, {}) is None
    assert set(KIMI_MARKERS) <= set(vocabulary(model))


@pytest.mark.parametrize(
    ("model", "kwargs", "inside"),
    [
        ("kimi_k2_thinking", {}, False),  # the model opens <think> itself
        ("kimi_k2_5", {}, True),  # the generation prompt opens it
        ("kimi_k2_5", {"thinking": False}, False),  # ... or closes an empty one
        ("minimax_m2", {}, True),  # `]~b]ai\n<think>\n`
    ],
)
def test_reasoning_is_think_and_where_generation_starts(
    model: str, kwargs: dict[str, Any], inside: bool
) -> None:
    template = template_of(model)
    request = {"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": kwargs}
    prompt = render(tokenizer_for(model), request)
    assert detect_reasoning(template, prompt, vocabulary(model)) == ("think", inside)
    assert ThinkFormat.START in template


def test_minimax_template_is_minimax_m2() -> None:
    template = template_of("minimax_m2")
    assert detect_tool_format(template, None, vocabulary("minimax_m2")) == "minimax_m2"
    assert detect_tool_format(template, None) == "minimax_m2"  # from the template alone


# --- what the model writes, parsed and sent back, renders as it was written ---------------------


def parse(fmt_name: str, text: str, tools: list[dict[str, Any]] | None = None) -> list[Any]:
    parser = tool_format(fmt_name)(tools)
    for piece in text:  # one character at a time
        parser.feed(piece)
    parser.finish()
    return parser.calls


def as_client_sends(calls: list[Any]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


@pytest.mark.parametrize("model", ["kimi_k2_thinking", "kimi_k2_5"])
def test_kimi_calls_round_trip_into_the_next_prompt(model: str) -> None:
    written = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:3"
        '<|tool_call_argument_begin|>{"city": "Oslo", "days": 2}<|tool_call_end|>'
        "<|tool_call_begin|>functions.get_time:4<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|>"
    )
    calls = parse("kimi_k2", written)
    assert [c.id for c in calls] == ["functions.get_weather:3", "functions.get_time:4"]
    request = {
        "messages": [
            {"role": "user", "content": "Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": as_client_sends(calls)},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "15C"},
            {"role": "tool", "tool_call_id": calls[1].id, "content": "12:00"},
        ]
    }
    prompt = render(tokenizer_for(model), request)
    assert written + "<|im_end|>" in prompt
    assert "## Return of functions.get_weather:3\n15C" in prompt


def test_minimax_calls_round_trip_into_the_next_prompt() -> None:
    case = fixture("minimax_m2")["cases"][0]
    tools = case["request"]["tools"]
    start = case["expected"].rindex("<minimax:tool_call>\n<invoke")
    end = case["expected"].index("</minimax:tool_call>", start) + len("</minimax:tool_call>")
    written = case["expected"][start:end]  # the model's block (the system prompt has an example)
    calls = parse("minimax_m2", written, tools)
    assert [json.loads(c.arguments) for c in calls] == [
        {"city": "Paris", "days": 3},
        {"city": "Zürich", "unit": "f", "opts": {"x": [1, True, None], "s": "é"}},
    ]
    request = {
        "messages": [
            {"role": "user", "content": "Paris and Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": as_client_sends(calls)},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "21C"},
        ],
        "tools": tools,
    }
    assert "\n" + written + "[e~[" in render(tokenizer_for("minimax_m2"), request)


# --- the server's split of a response into OpenAI's reasoning, content and tool calls -----------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


def answer(model: str, text: str) -> tuple[Any, Any, list[Any]]:
    """(output config, final message, streamed deltas) of `text` after a one-user-turn prompt."""
    template, vocab = template_of(model), vocabulary(model)
    body = {"messages": [{"role": "user", "content": "Oslo?"}], "tools": [WEATHER]}
    prompt = render(tokenizer_for(model), body)
    runtime = SimpleNamespace(
        tool_format=detect_tool_format(template, None, vocab),
        chat_template=template,
        vocabulary=lambda: vocab,
        tokenizer=SimpleNamespace(special_token_ids=frozenset(vocab.values())),
    )
    req = ChatCompletionRequest.model_validate({"model": "m", **body})
    config = output_config(runtime, req, prompt)  # type: ignore[arg-type]
    # The markers are special tokens of the stand-in vocabulary: the server keeps them.
    markers = {vocab[m] for m in tool_format(runtime.tool_format).MARKERS if m in vocab}
    assert markers and markers <= kept_special_ids(runtime, config)  # type: ignore[arg-type]
    choice = ChoiceAssembler(config)
    deltas = [d for i in range(0, len(text), 5) for d in choice.feed(text[i : i + 5])]
    return config, choice.message(), deltas + choice.finish()


def test_kimi_k2_5_answer_in_openai_shapes() -> None:
    text = (
        "Oslo needs a call.</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        "<|tool_calls_section_end|>"
    )
    config, message, deltas = answer("kimi_k2_5", text)
    assert config.tool_format == "kimi_k2" and config.reasoning == ("think", True)
    assert message.reasoning_content == "Oslo needs a call." and message.content == "Checking."
    (call,) = message.tool_calls
    assert call.id == "functions.get_weather:0" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    started = [c for d in deltas for c in d.tool_calls or () if c.id]
    assert [c.id for c in started] == ["functions.get_weather:0"]  # the stream carries it too


def test_minimax_m2_answer_in_openai_shapes() -> None:
    text = (
        "Need the weather.\n</think>\n\nChecking.\n<minimax:tool_call>\n"
        '<invoke name="get_weather">\n<parameter name="city">Oslo</parameter>\n'
        '<parameter name="days">2</parameter>\n</invoke>\n</minimax:tool_call>'
    )
    config, message, _ = answer("minimax_m2", text)
    assert config.tool_format == "minimax_m2" and config.reasoning == ("think", True)
    # The reasoning keeps the newline the model wrote before </think>; the template, given it
    # back, adds its own around it.
    assert message.reasoning_content == "Need the weather.\n" and message.content == "Checking."
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo", "days": 2}
