"""gpt-oss's and DeepSeek-V3.1's real chat templates: rendering equals transformers', detection.

The expected prompts in ``tests/fixtures/templates/<model>/rendered.json`` were rendered by
transformers (``render_harmony_deepseek.py`` beside them) from the conversations stored with
them. Here moeserve renders each stored request the way the server does: the request body
parsed as a ``ChatCompletionRequest``, its messages through ``template_dict`` and
``Tokenizer.apply_chat_template`` (``routes.chat.render_prompt``). gpt-oss's template prints
today's date; both sides pin it to the fixture's date.
"""

from __future__ import annotations

import datetime as real_datetime
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as Backend

from moeserve.server.http.protocol import ChatCompletionRequest
from moeserve.server.http.routes.chat import render_prompt
from moeserve.server.text import chat_template
from moeserve.server.text.chat_template import (
    CHATML_TEMPLATE,
    load_templates,
    wants_argument_objects,
)
from moeserve.server.text.formats import detect_reasoning, detect_tool_format, tool_format
from moeserve.server.text.tokenizer import Tokenizer

TEMPLATES = Path(__file__).parents[3] / "fixtures" / "templates"
MODELS = ("gpt_oss_20b", "deepseek_v31")


def fixture(model: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / model / "rendered.json").read_text(encoding="utf-8"))


def template_of(model: str) -> str:
    path = TEMPLATES / model
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return load_templates(path, config)["default"]  # chat_template.jinja, as a model dir has it


def tokenizer_for(model: str) -> Tokenizer:
    """Our tokenizer with the model's template and special tokens (a stand-in vocabulary)."""
    specials = fixture(model)["special_tokens"]
    vocab = {"<unk>": 0, **{t: i + 1 for i, t in enumerate(specials.values())}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    return Tokenizer(backend, **specials, chat_templates={"default": template_of(model)})


@pytest.fixture
def fixed_date(monkeypatch: pytest.MonkeyPatch) -> None:
    date = real_datetime.datetime.fromisoformat(fixture("gpt_oss_20b")["date"])

    class FixedDatetime(real_datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> real_datetime.datetime:
            return date

    monkeypatch.setattr(chat_template, "datetime", FixedDatetime)


def render(tokenizer: Tokenizer, request: dict[str, Any]) -> str:
    req = ChatCompletionRequest.model_validate({"model": "m", **request})
    runtime = SimpleNamespace(tokenizer=tokenizer, max_model_len=1 << 20, extra={})
    return render_prompt(runtime, req)[1]  # type: ignore[arg-type]


CASES = [(m, c["name"]) for m in MODELS for c in fixture(m)["cases"]]


@pytest.mark.parametrize(("model", "name"), CASES)
def test_rendering_equals_transformers(model: str, name: str, fixed_date: None) -> None:
    case = next(c for c in fixture(model)["cases"] if c["name"] == name)
    assert render(tokenizer_for(model), case["request"]) == case["expected"]


def test_the_model_card_example_renders_as_documented() -> None:
    # DeepSeek-V3.1's model card prints this rendering; the transformers fixture agrees.
    case = next(c for c in fixture("deepseek_v31")["cases"] if c["name"] == "model_card_thinking")
    assert case["expected"] == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Who are you?<｜Assistant｜>"
        "</think>I am DeepSeek<｜end▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜><think>"
    )


def test_null_content_beside_tool_calls_renders_like_empty_content(fixed_date: None) -> None:
    # Clients send content null with tool calls; DeepSeek's template would concatenate it (and
    # transformers, which drops null keys, fails on it), so the server renders it as "".
    for model in MODELS:
        case = next(c for c in fixture(model)["cases"] if "tool_calls" in str(c["request"]))
        request = json.loads(json.dumps(case["request"]))
        for message in request["messages"]:
            if message.get("tool_calls") and not message.get("content"):
                message["content"] = None
        assert render(tokenizer_for(model), request) == case["expected"], model


def test_argument_objects_are_decoded_only_for_templates_that_want_them() -> None:
    assert wants_argument_objects(template_of("gpt_oss_20b"))  # `arguments|tojson`
    assert not wants_argument_objects(template_of("deepseek_v31"))  # `+ ...['arguments'] +`
    assert not wants_argument_objects(CHATML_TEMPLATE)  # `arguments is string`
    messages = [
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a":1}'}}]},
        {"role": "assistant", "tool_calls": [{"name": "g", "arguments": "not json"}]},
    ]
    prepared = chat_template.prepare_messages(messages, template_of("gpt_oss_20b"))
    assert prepared[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert prepared[1]["tool_calls"][0]["arguments"] == "not json"
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a":1}'  # not changed
    same = chat_template.prepare_messages(messages, template_of("deepseek_v31"))
    assert same == messages


def test_reasoning_reaches_the_template_under_every_name() -> None:
    messages = [{"role": "assistant", "content": "x", "reasoning": "why"}]
    (prepared,) = chat_template.prepare_messages(messages, CHATML_TEMPLATE)
    assert prepared["reasoning_content"] == prepared["thinking"] == "why"
    own = [{"role": "assistant", "reasoning_content": "a", "thinking": "b"}]
    (prepared,) = chat_template.prepare_messages(own, CHATML_TEMPLATE)
    assert prepared["reasoning_content"] == "a" and prepared["thinking"] == "b"


# --- detection: each real template is read as its formats ---------------------------------------


def vocabulary(model: str) -> dict[str, int]:
    config_file = TEMPLATES / model / "tokenizer_config.json"
    if not config_file.is_file():
        return {}
    added = json.loads(config_file.read_text())["added_tokens_decoder"]
    return {t["content"]: int(i) for i, t in added.items()}


def test_gpt_oss_is_harmony_and_its_markers_are_special_tokens(fixed_date: None) -> None:
    template = template_of("gpt_oss_20b")
    config = json.loads((TEMPLATES / "gpt_oss_20b" / "tokenizer_config.json").read_text())
    vocab = vocabulary("gpt_oss_20b")
    assert detect_tool_format(template, config, vocab) == "harmony"
    fmt = tool_format("harmony")
    assert fmt.SPLITS_REASONING  # so no separate reasoning format is asked for
    prompt = render(tokenizer_for("gpt_oss_20b"), fixture("gpt_oss_20b")["cases"][0]["request"])
    assert detect_reasoning(template, prompt, vocab) is None and prompt.endswith(
        "<|start|>assistant"
    )
    added = config["added_tokens_decoder"]
    special = {t["content"] for t in added.values() if t["special"]}
    assert set(fmt.MARKERS) <= special  # the server must keep them in the text for the parser
    # The first generation config ends at <|return|> only; the format adds <|call|> (200012).
    generation = json.loads((TEMPLATES / "gpt_oss_20b" / "generation_config.json").read_text())
    turn_ends = {vocab[m] for m in fmt.TURN_END}
    assert turn_ends == {200002, 200012} and not turn_ends <= set(generation["eos_token_id"])


@pytest.mark.parametrize("thinking", [True, False])
def test_deepseek_v31_is_deepseek_v31_with_think_blocks(thinking: bool) -> None:
    template = template_of("deepseek_v31")
    assert detect_tool_format(template, None) == "deepseek_v31"
    request = {
        "messages": [{"role": "user", "content": "Hi"}],
        "chat_template_kwargs": {"thinking": thinking},
    }
    prompt = render(tokenizer_for("deepseek_v31"), request)
    # V3.1 opens the block in the generation prompt when thinking, and closes it when not.
    assert detect_reasoning(template, prompt) == ("think", thinking)
