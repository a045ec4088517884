"""How a chat request's text is split for harmony (gpt-oss) and DeepSeek-V3.1 (routes/chat*.py).

Harmony splits reasoning itself, so its parser runs on every response, tools or not, with no
reasoning format beside it; DeepSeek-V3.1 pairs the "think" reasoning format with its call
sections. Both end up in OpenAI's ``reasoning_content``, ``content`` and ``tool_calls``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from moeserve.server.http.protocol import ChatCompletionRequest
from moeserve.server.http.routes.chat import kept_special_ids, output_config
from moeserve.server.http.routes.chat_output import ChoiceAssembler, OutputConfig
from moeserve.server.text.formats.harmony import HarmonyFormat

TEMPLATES = Path(__file__).parents[3] / "fixtures" / "templates"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
HARMONY_TEXT = (
    "<|channel|>analysis<|message|>Need the weather.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city":"Paris"}'
)


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def runtime(fmt: str, template: str, vocab: dict[str, int] | None = None) -> SimpleNamespace:
    vocab = vocab or {}
    tokenizer = SimpleNamespace(special_token_ids=frozenset(vocab.values()))
    return SimpleNamespace(
        tool_format=fmt, chat_template=template, vocabulary=lambda: vocab, tokenizer=tokenizer
    )


def assemble(config: OutputConfig, text: str, pieces: int = 7) -> tuple[list, ChoiceAssembler]:
    choice = ChoiceAssembler(config)
    step = max(1, len(text) // pieces)
    deltas = [d for i in range(0, len(text), step) for d in choice.feed(text[i : i + step])]
    return deltas + choice.finish(), choice


@pytest.mark.parametrize(
    ("fields", "constrained"),
    [
        ({}, False),
        ({"tools": [WEATHER], "tool_choice": "none"}, False),
        ({"tools": [WEATHER]}, True),
    ],
)
def test_harmony_parses_every_response(fields: dict, constrained: bool) -> None:
    rt = runtime("harmony", "<|channel|><|message|> <think>")
    config = output_config(rt, request(**fields), "<|start|>assistant", constrained)  # type: ignore[arg-type]
    tools_on = "tools" in fields and fields.get("tool_choice") != "none"
    assert config.tool_format == "harmony" and config.reasoning is None
    assert config.tools == ([WEATHER] if tools_on else None)


def test_harmony_markers_are_kept_even_without_tools() -> None:
    vocab = {m: 200000 + i for i, m in enumerate(HarmonyFormat.MARKERS)}
    rt = runtime("harmony", "<|channel|><|message|>", vocab)
    config = output_config(rt, request(), "<|start|>assistant")  # type: ignore[arg-type]
    assert kept_special_ids(rt, config) == frozenset(vocab.values())  # type: ignore[arg-type]


def test_harmony_reasoning_and_call_in_openai_shapes() -> None:
    config = OutputConfig(tool_format="harmony", tools=[WEATHER])
    deltas, choice = assemble(config, HARMONY_TEXT)
    assert "".join(d.reasoning_content or "" for d in deltas) == "Need the weather."
    streamed = [c for d in deltas for c in d.tool_calls or []]
    assert streamed[0].function.name == "get_weather" and streamed[0].id
    assert "".join(c.function.arguments for c in streamed) == '{"city":"Paris"}'
    message = choice.message()
    assert message.content is None and message.reasoning_content == "Need the weather."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city":"Paris"}')
    ]


def test_harmony_without_tools_answers_in_content() -> None:
    text = (
        "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>4"
    )
    _, choice = assemble(OutputConfig(tool_format="harmony"), text)
    message = choice.message()
    assert (message.content, message.reasoning_content, message.tool_calls) == ("4", "Easy.", None)


def deepseek_template() -> str:
    return (TEMPLATES / "deepseek_v31" / "chat_template.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize(("prompt_end", "inside"), [("<think>", True), ("</think>", False)])
def test_deepseek_pairs_think_with_its_calls(prompt_end: str, inside: bool) -> None:
    rt = runtime("deepseek_v31", deepseek_template())
    config = output_config(rt, request(tools=[WEATHER]), "<｜Assistant｜>" + prompt_end)  # type: ignore[arg-type]
    assert config.tool_format == "deepseek_v31" and config.reasoning == ("think", inside)
    plain = output_config(rt, request(), "<｜Assistant｜>" + prompt_end)  # type: ignore[arg-type]
    assert plain.tool_format is None and plain.reasoning == ("think", inside)


def test_deepseek_reasoning_content_and_calls() -> None:
    config = OutputConfig(tool_format="deepseek_v31", reasoning=("think", True), tools=[WEATHER])
    text = (
        "Look it up.</think>\n\nChecking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather"
        '<｜tool▁sep｜>{"city": "Rome"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    )
    _, choice = assemble(config, text)
    message = choice.message()
    assert message.reasoning_content == "Look it up." and message.content == "Checking."
    call = message.tool_calls[0].function
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Rome"})
