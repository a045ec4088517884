"""Real chat templates (tests/fixtures/templates): rendering, detection, parsing back, tokenizing.

The expected prompts and token ids were produced by transformers (5.x) with
tests/fixtures/templates/gen_expected.py and are committed, so these tests need no
transformers. A request goes the server's way: `ChatCompletionRequest` -> `template_dict` ->
`Tokenizer.apply_chat_template`, and must give transformers' text exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from moeserve.server.http.protocol import ChatCompletionRequest
from moeserve.server.text.formats import (
    detect_reasoning,
    detect_tool_format,
    reasoning_format,
    tool_format,
)
from moeserve.server.text.tokenizer import Tokenizer
from tests.fixtures.templates.gen_expected import (
    ARGS,
    CASES,
    HERE,
    SPECIALS,
    WEATHER_TOOL,
    mixtral_tokenizer_dir,
    template_of,
)


def _cases() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name in CASES:
        expected = json.loads((HERE / name / "expected.json").read_text(encoding="utf-8"))
        found += [(name, case) for case in expected["cases"]]
    return found


def _ours(name: str) -> Tokenizer:
    """The model's tokenizer as the server builds it (any vocabulary will do for rendering)."""
    specials = SPECIALS[CASES[name][0]]
    config_file = HERE / name / "tokenizer_config.json"
    if config_file.is_file():  # a real tokenizer_config.json declares the same tokens
        config = json.loads(config_file.read_text(encoding="utf-8"))
        assert {k: config.get(k) for k in specials} == specials
    return Tokenizer(
        tokenizers.Tokenizer(tokenizers.models.BPE()),
        bos_token=specials.get("bos_token"),
        eos_token=specials.get("eos_token"),
        pad_token=specials.get("pad_token"),
        chat_templates={"default": template_of(HERE / name)},
    )


def _render(name: str, request: dict[str, Any]) -> str:
    req = ChatCompletionRequest.model_validate({"model": "m", **request})
    return _ours(name).apply_chat_template(
        [m.template_dict() for m in req.messages],
        tools=req.tool_dicts(),
        add_generation_prompt=True,
        **(req.chat_template_kwargs or {}),
    )


@pytest.mark.parametrize(
    ("name", "case"), _cases(), ids=lambda v: v if isinstance(v, str) else v["case"]
)
def test_rendering_equals_transformers(name: str, case: dict[str, Any]) -> None:
    assert _render(name, case["request"]) == case["prompt"]


# Tool format and reasoning format each template is detected as (from the template alone).
DETECTED = {
    "qwen3_30b_a3b": ("qwen", "think"),
    "qwen3_coder_30b_a3b_instruct": ("qwen_xml", None),
    "qwen3_coder_v2": ("qwen_xml", None),
    "qwen3_next_80b_a3b_instruct": ("qwen", None),
    "qwen3_next_80b_a3b_thinking": ("qwen", "think"),
    "qwen3_5_35b_a3b": ("qwen_xml", "think"),
    "mixtral_8x7b_instruct_v01": (None, None),  # no tools in its template
    "mixtral_8x7b_instruct_v01_original": (None, None),
    "mixtral_8x22b_instruct_v01": ("mistral", None),
}
# Whether generation starts inside <think> after each case's prompt.
STARTS_INSIDE = {
    ("qwen3_30b_a3b", "chat"): False,  # the hybrid model decides itself
    ("qwen3_30b_a3b", "no_thinking"): False,  # an empty closed block
    ("qwen3_next_80b_a3b_thinking", "chat"): True,
    ("qwen3_5_35b_a3b", "chat"): True,
    ("qwen3_5_35b_a3b", "no_thinking"): False,
}


@pytest.mark.parametrize("name", sorted(DETECTED))
def test_detection(name: str) -> None:
    template = template_of(HERE / name)
    tools, reasoning = DETECTED[name]
    assert detect_tool_format(template, None) == tools
    found = detect_reasoning(template, "")
    assert (found and found[0]) == reasoning
    cases = {c["case"]: c["prompt"] for _, c in _cases() if _ == name}
    for (model, case), inside in STARTS_INSIDE.items():
        if model == name:
            assert detect_reasoning(template, cases[case]) == ("think", inside)


def test_the_vocabulary_names_think_where_the_template_does_not() -> None:
    # Qwen3-Coder's tokenizer has <think> tokens its template never writes: the think parser
    # then runs too, which only matters if the output starts with <think>.
    config = json.loads(
        (HERE / "qwen3_coder_30b_a3b_instruct" / "tokenizer_config.json").read_text()
    )
    vocabulary = {t["content"] for t in config["added_tokens_decoder"].values()}
    template = config["chat_template"]
    assert detect_reasoning(template, "", vocabulary) == ("think", False)
    assert detect_tool_format(template, config, vocabulary) == "qwen_xml"


def _assistant_turn(name: str, prompt: str) -> str:
    """The text of the tool-calling assistant turn, as the model would have generated it."""
    if name.startswith("mixtral"):
        return prompt.split("[/INST]")[1].split("</s>")[0]
    turns = prompt.split("<|im_start|>assistant\n")[1:]  # the system turn shows an example call
    turn = next(t for t in turns if "<tool_call>" in t)
    return turn.split("<|im_end|>")[0]


@pytest.mark.parametrize(("name", "case"), [(n, c) for n, c in _cases() if c["case"] == "tools"])
def test_rendered_calls_parse_back(name: str, case: dict[str, Any]) -> None:
    text = _assistant_turn(name, case["prompt"])
    reasoning = detect_reasoning(template_of(HERE / name), "")
    if reasoning:  # Qwen3.5 writes an empty <think> block before a call after the last query
        reasoning_parser = reasoning_format(reasoning[0])()
        text = reasoning_parser.feed(text)[1] + reasoning_parser.finish()[1]
    parser = tool_format(DETECTED[name][0])([WEATHER_TOOL])
    events = parser.feed(text) + parser.finish()
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("get_weather", ARGS)]
    assert not [e for e in events if type(e).__name__ == "ContentDelta"]


# --- Mixtral's [INST] spacing -------------------------------------------------------------------

TOKENIZATION = json.loads((HERE / "mixtral_8x7b_instruct_v01" / "tokenization.json").read_text())


@pytest.mark.parametrize("form", sorted(TOKENIZATION))
def test_mixtral_prompts_tokenize_as_transformers_5(form: str, tmp_path: Path) -> None:
    ours = Tokenizer.from_dir(mixtral_tokenizer_dir(tmp_path, legacy=form == "legacy"))
    prompts = {
        f"{name}/{case['case']}": case["prompt"]
        for name, case in _cases()
        if f"{name}/{case['case']}" in TOKENIZATION[form]
    }
    assert prompts.keys() == TOKENIZATION[form].keys()
    for key, prompt in prompts.items():
        assert ours.encode(prompt) == TOKENIZATION[form][key]["transformers"], key


def test_the_legacy_file_read_as_written_splits_inst() -> None:
    # What the fix is for: Mixtral's own tokenizer.json, read as written, gives "▁" + "▁[" for
    # " [INST]" after <s>, where transformers 5 (and mistral-common) give "▁[" alone.
    written = TOKENIZATION["legacy"]["mixtral_8x7b_instruct_v01/chat"]
    assert written["tokenizer_json_as_written"][:3] == [1, 28705, 733]
    assert written["transformers"][:3] == [1, 733, 16289]
