"""GLM-4.5's, Ling's and Granite 3.0's real chat templates: tool round trips equal transformers'.

The expected prompts in ``tests/fixtures/templates/<model>/rendered.json`` were rendered by
transformers (``render_glm_ling_granite.py`` beside them) from the conversations stored with
them: tool-call arguments as the JSON text a client sends, ``content`` null beside the calls,
reasoning under both names clients use. Here moeserve renders each stored request the way the
server does (``routes.chat.render_prompt``: the body parsed as a ``ChatCompletionRequest``, its
messages through ``template_dict`` and ``Tokenizer.apply_chat_template``, which prepares them
with ``chat_template.prepare_messages``). Then GLM-4.5's template is detected as its formats, and
a call the model writes, parsed and sent back by a client, renders as the model wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as Backend

from moeserve.server.http.errors import APIError
from moeserve.server.http.protocol import ChatCompletionRequest
from moeserve.server.http.routes.chat import render_prompt
from moeserve.server.text.chat_template import load_templates, wants_argument_objects
from moeserve.server.text.formats import detect_reasoning, detect_tool_format, tool_format
from moeserve.server.text.tokenizer import Tokenizer

TEMPLATES = Path(__file__).parents[3] / "fixtures" / "templates"
MODELS = ("glm45_air", "ling_lite", "granite_3_0_8b_instruct")
GLM_MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>")
GLM_MARKERS += ("<arg_value>", "</arg_value>", "<|observation|>", "<|user|>", "<|assistant|>")


def fixture(model: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / model / "rendered.json").read_text(encoding="utf-8"))


def template_of(model: str) -> str:
    return load_templates(TEMPLATES / model, {})["default"]  # chat_template.jinja


def tokenizer_for(model: str) -> Tokenizer:
    """Our tokenizer with the model's template and a stand-in vocabulary of special tokens."""
    specials = fixture(model)["special_tokens"]
    names = GLM_MARKERS if model.startswith("glm") else ()
    vocab = {"<unk>": 0, **{t: i + 1 for i, t in enumerate(dict.fromkeys(names))}}
    for token in specials.values():
        vocab.setdefault(token, len(vocab))
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(t, special=True) for t in vocab if t != "<unk>"])
    return Tokenizer(backend, **specials, chat_templates={"default": template_of(model)})


def render(tokenizer: Tokenizer, request: dict[str, Any]) -> str:
    req = ChatCompletionRequest.model_validate({"model": "m", **request})
    runtime = SimpleNamespace(tokenizer=tokenizer, max_model_len=1 << 20, extra={})
    return render_prompt(runtime, req)[1]  # type: ignore[arg-type]


CASES = [(m, c["name"]) for m in MODELS for c in fixture(m)["cases"]]


@pytest.mark.parametrize(("model", "name"), CASES)
def test_rendering_equals_transformers(model: str, name: str) -> None:
    case = next(c for c in fixture(model)["cases"] if c["name"] == name)
    prompt = render(tokenizer_for(model), case["request"])
    assert prompt == case["expected"]
    assert "None" not in prompt  # a null content is never the text "None"


def test_the_fixtures_hold_what_the_wire_sends() -> None:
    """JSON-text arguments, null content beside calls, reasoning under both names."""
    messages = [m for c in fixture("glm45_air")["cases"] for m in c["request"]["messages"]]
    calls = [c for m in messages for c in m.get("tool_calls") or []]
    assert calls and all(isinstance(c["function"]["arguments"], str) for c in calls)
    assert all(m["content"] is None for m in messages if m.get("tool_calls"))
    assert {"reasoning", "reasoning_content"} <= {k for m in messages for k in m}


def test_glm45_decodes_argument_text_and_renders_the_turns_reasoning() -> None:
    assert wants_argument_objects(template_of("glm45_air"))  # it iterates arguments.items()
    cases = {c["name"]: c["expected"] for c in fixture("glm45_air")["cases"]}
    assert "<arg_key>days</arg_key>\n<arg_value>3</arg_value>" in cases["tool_round_trip"]
    assert "<think>Two cities: two calls.</think>" in cases["tool_round_trip"]
    # `reasoning` (vLLM's newer name) reaches the template too; an earlier turn's is dropped.
    assert "<think>Call get_time.</think>" in cases["earlier_turns_and_reasoning"]
    assert "A greeting." not in cases["earlier_turns_and_reasoning"]


def test_glm45_argument_text_that_is_no_object_is_a_400() -> None:
    """Text that is not a JSON object stays text, which GLM-4.5's template cannot iterate."""
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "[1]"}}
    request = {
        "messages": [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
    }
    with pytest.raises(APIError) as err:
        render(tokenizer_for("glm45_air"), request)
    assert err.value.status == 400


def test_glm45_template_is_glm45_and_think() -> None:
    template, vocab = template_of("glm45_air"), dict.fromkeys(GLM_MARKERS, 1)
    assert detect_tool_format(template, None, vocab) == "glm45"
    prompt = render(tokenizer_for("glm45_air"), {"messages": [{"role": "user", "content": "Hi"}]})
    assert detect_reasoning(template, prompt, vocab) == ("think", False)  # the model opens it
    off = fixture("glm45_air")["cases"][2]["expected"]
    assert detect_reasoning(template, off, vocab) == ("think", False)  # an empty closed block


def test_glm45_calls_round_trip_into_the_next_prompt() -> None:
    case = fixture("glm45_air")["cases"][0]
    expected, tools = case["expected"], case["request"]["tools"]
    start = expected.index("<think>Two cities: two calls.</think>\n") + len(
        "<think>Two cities: two calls.</think>\n"
    )
    written = expected[start : expected.index("<|observation|>")]  # the model's two calls
    parser = tool_format("glm45")(tools)
    for piece in written:  # one character at a time
        parser.feed(piece)
    parser.finish()
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in parser.calls
    ]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris", "days": 3},
        {"city": "Zürich", "unit": "f", "opts": {"x": [1, True, None], "s": "é"}},
    ]
    messages = case["request"]["messages"]
    request = {
        "messages": [*messages[:2], {**messages[2], "tool_calls": calls}, *messages[3:]],
        "tools": tools,
    }
    assert render(tokenizer_for("glm45_air"), request) == expected
