"""Tests for server/text/tokenizer.py and devtools/tokenizer_build.py."""

from __future__ import annotations

import json
import random
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest

from moeserve.devtools.tokenizer_build import (
    build_bpe_tokenizer,
    build_sentencepiece_style_tokenizer,
)
from moeserve.server.text.tokenizer import CHATML_TEMPLATE, StopMatcher, TemplateError, Tokenizer

SAMPLE = "Hello, world!\n  Ça va? 你好世界 🙂🚀👍🏽 naïve <think>hmm</think> done."
WORDS = ["the", " model", " server", "Hello", ",", ".", "\n", "  ", " 42", "-", "?"]
MULTIBYTE = ["你", "好", "模型", "世界", "é", "ï", "ß", "🙂", "🚀", "👍🏽", "👩‍💻", "€", " Ça"]
USER_HI = [{"role": "user", "content": "hi"}]


def variant_dir(src: Path, dst: Path, config: dict | None = None, **files: str | dict) -> Path:
    """Copy a tokenizer dir, optionally replacing its config and adding files."""
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    if config is None:
        shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    else:
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (dst / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return dst


def with_template(src: Path, dst: Path, template: str | list) -> Tokenizer:
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    return Tokenizer.from_dir(variant_dir(src, dst, config))


def random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(WORDS if rng.random() < 0.5 else MULTIBYTE) for _ in range(pieces))


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = tokenizer.detokenizer()
    return [detok.add(i) for i in ids] + [detok.flush()]


# --- loading, encode/decode, special tokens -------------------------------------------------


def test_round_trip(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode(SAMPLE)
    assert all(0 <= i < any_tokenizer.vocab_size for i in ids)
    assert any_tokenizer.decode(ids) == SAMPLE


def test_special_tokens_bpe(bpe_tokenizer: Tokenizer) -> None:
    backend = bpe_tokenizer.backend
    assert bpe_tokenizer.eos_token == "<|im_end|>"
    assert bpe_tokenizer.eos_token_ids == {backend.token_to_id("<|im_end|>")}
    assert bpe_tokenizer.pad_token_id == backend.token_to_id("<|endoftext|>")
    assert bpe_tokenizer.bos_token is None and bpe_tokenizer.bos_token_id is None
    # Special-token text in the input is recognised, and skipped again when decoding.
    ids = bpe_tokenizer.encode("<|im_start|>user")
    assert ids[0] == backend.token_to_id("<|im_start|>")
    assert bpe_tokenizer.decode(ids) == "user"
    assert bpe_tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user"
    assert bpe_tokenizer.encode("hi", add_special_tokens=True) == bpe_tokenizer.encode("hi")


def test_special_tokens_sentencepiece(sp_tokenizer: Tokenizer) -> None:
    bos = sp_tokenizer.backend.token_to_id("<s>")
    assert sp_tokenizer.bos_token == "<s>" and sp_tokenizer.bos_token_id == bos
    assert sp_tokenizer.eos_token_ids == {sp_tokenizer.backend.token_to_id("</s>")}
    assert sp_tokenizer.encode("hi", add_special_tokens=True) == [bos, *sp_tokenizer.encode("hi")]
    # Characters outside the trained vocabulary fall back to their UTF-8 bytes.
    assert [sp_tokenizer.backend.id_to_token(i) for i in sp_tokenizer.encode("€")][-3:] == [
        "<0xE2>",
        "<0x82>",
        "<0xAC>",
    ]


def test_eos_ids_merge_all_sources(bpe_dir: Path, tmp_path: Path) -> None:
    root = variant_dir(
        bpe_dir,
        tmp_path / "m",
        generation_config__json={"eos_token_id": [7, 9], "pad_token_id": 1},
        config__json={"eos_token_id": 11, "model_type": "x"},
    )
    tok = Tokenizer.from_dir(root)
    assert tok.eos_token_ids == {tok.backend.token_to_id("<|im_end|>"), 7, 9, 11}
    root = variant_dir(bpe_dir, tmp_path / "n", generation_config__json={"eos_token_id": 5})
    assert Tokenizer.from_dir(root).eos_token_ids == {tok.backend.token_to_id("<|im_end|>"), 5}


def test_special_tokens_map_and_added_token_dicts(bpe_dir: Path, tmp_path: Path) -> None:
    config = {"eos_token": {"content": "<|endoftext|>", "special": True}}
    root = variant_dir(
        bpe_dir, tmp_path / "m", config, special_tokens_map__json={"pad_token": "<|im_start|>"}
    )
    tok = Tokenizer.from_dir(root)
    assert tok.eos_token_ids == {tok.backend.token_to_id("<|endoftext|>")}
    assert tok.pad_token_id == tok.backend.token_to_id("<|im_start|>")


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_build_is_deterministic_and_fast(tmp_path: Path) -> None:
    for build in (build_bpe_tokenizer, build_sentencepiece_style_tokenizer):
        start = time.perf_counter()
        a = build(tmp_path / f"{build.__name__}_a")
        assert time.perf_counter() - start < 2.0
        b = build(tmp_path / f"{build.__name__}_b")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes()
        assert Tokenizer.from_dir(a).vocab_size == 512
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe_tokenizer(tmp_path / "tiny", vocab_size=100)


# --- chat templates -------------------------------------------------------------------------


def test_chatml_template_with_generation_prompt(bpe_tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "S"}, *USER_HI]
    body = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert bpe_tokenizer.apply_chat_template(messages) == body + "<|im_start|>assistant\n"
    assert bpe_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == body


def test_no_template_falls_back_to_chatml(sp_tokenizer: Tokenizer) -> None:
    assert sp_tokenizer.chat_templates == {}
    assert sp_tokenizer.apply_chat_template(USER_HI) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tools_and_tool_calls_rendered(bpe_tokenizer: Tokenizer) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    calls = [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Köln"}}},
    ]
    messages = [
        *USER_HI,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "1", "content": "18C"},
    ]
    text = bpe_tokenizer.apply_chat_template(messages, tools=[tool])
    assert json.dumps(tool) in text.split("<tools>\n")[1]
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert '{"name": "get_weather", "arguments": {"city": "Köln"}}' in text
    assert "<|im_start|>tool\n18C<|im_end|>\n" in text


def test_tool_call_arguments_reach_template_unchanged(bpe_dir: Path, tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{{ c.function.arguments is mapping }}:{{ c.function.arguments.city }};"
        "{% endfor %}{% endfor %}"
    )
    tok = with_template(bpe_dir, tmp_path / "m", template)
    calls = [
        {"function": {"name": "f", "arguments": {"city": "Paris"}}},
        {"function": {"name": "f", "arguments": '{"city": "Lyon"}'}},
    ]
    rendered = tok.apply_chat_template([{"role": "assistant", "tool_calls": calls}])
    assert rendered == "True:Paris;False:;"


def test_hf_globals_filters_and_kwargs(bpe_dir: Path, tmp_path: Path) -> None:
    template = (
        "{{ messages[0].content | tojson }}#{{ messages[0].content | tojson(indent=2) }}#"
        "{{ data | tojson(separators=(',', ':'), sort_keys=true) }}#{{ strftime_now('%Y') }}#"
        "{{ 'think' if enable_thinking else 'plain' }}#{{ bos_token }}#{{ eos_token }}#"
        "{% for x in [1, 2, 3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}"
    )
    tok = with_template(bpe_dir, tmp_path / "m", template)
    content, data = ["<b>&'é"], {"b": 1, "a": [1, 2]}
    year = str(datetime.now().year)
    parts = tok.apply_chat_template(
        [{"role": "user", "content": content}], data=data, enable_thinking=True
    ).split("#")
    assert parts[0] == json.dumps(content, ensure_ascii=False)
    assert parts[1] == json.dumps(content, ensure_ascii=False, indent=2)
    assert parts[2] == json.dumps(data, separators=(",", ":"), sort_keys=True)
    assert parts[3] in {year, str(datetime.now().year)}
    assert parts[4:] == ["think", "", "<|im_end|>", "1"]
    assert tok.apply_chat_template(USER_HI, data=1, enable_thinking=False).split("#")[4] == "plain"
    with pytest.raises(TemplateError, match="tojson"):  # `data` undefined
        tok.apply_chat_template(USER_HI)


def test_raise_exception_and_sandbox(bpe_dir: Path, tmp_path: Path) -> None:
    tok = with_template(
        bpe_dir,
        tmp_path / "a",
        "{% if messages[0].role != 'user' %}{{ raise_exception('u!') }}{% endif %}",
    )
    assert tok.apply_chat_template(USER_HI) == ""
    with pytest.raises(TemplateError, match="u!"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    tok = with_template(bpe_dir, tmp_path / "b", "{% set ns = namespace(a=1) %}{% set ns._x = 2 %}")
    with pytest.raises(TemplateError):
        tok.apply_chat_template(USER_HI)
    tok = with_template(bpe_dir, tmp_path / "c", "{{ messages.append(1) }}")
    with pytest.raises(TemplateError):  # the environment is immutable
        tok.apply_chat_template(USER_HI)
    with pytest.raises(TemplateError, match="compile"):
        with_template(bpe_dir, tmp_path / "d", "{% for %}")


def test_template_list_selection(bpe_dir: Path, tmp_path: Path) -> None:
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    tok = with_template(bpe_dir, tmp_path / "a", named)
    assert tok.apply_chat_template(USER_HI) == "D"
    assert tok.apply_chat_template(USER_HI, tools=[{"type": "function"}]) == "T"
    tok = with_template(bpe_dir, tmp_path / "b", named[:1])
    assert tok.apply_chat_template(USER_HI, tools=[{"type": "function"}]) == "D"
    with pytest.raises(ValueError, match="default"):
        with_template(bpe_dir, tmp_path / "c", named[1:])


def test_chat_template_jinja_takes_precedence(bpe_dir: Path, tmp_path: Path) -> None:
    root = variant_dir(bpe_dir, tmp_path / "m", chat_template__jinja="FILE {{ messages | length }}")
    assert Tokenizer.from_dir(root).apply_chat_template(USER_HI) == "FILE 1"


def test_tokenize_chat_does_not_add_bos_twice(sp_dir: Path, tmp_path: Path) -> None:
    tok = with_template(sp_dir, tmp_path / "m", "{{ bos_token }}{{ messages[0].content }}")
    ids = tok.tokenize_chat([{"role": "user", "content": "the model"}])
    assert ids == tok.encode("<s>the model")
    assert ids.count(tok.bos_token_id) == 1


def test_matches_transformers_rendering(bpe_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(bpe_dir))
    tok = Tokenizer.from_dir(bpe_dir)
    tool = {"type": "function", "function": {"name": "f", "description": "<é>", "parameters": {}}}
    calls = [{"type": "function", "function": {"name": "f", "arguments": {"x": "ü"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "!"}],
        },
        {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
        {"role": "tool", "content": "ok"},
    ]
    for tools in (None, [tool]):
        expected = reference.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
        assert tok.apply_chat_template(messages, tools=tools) == expected
    assert tok.chat_templates["default"] == CHATML_TEMPLATE


# --- streaming detokenizer ------------------------------------------------------------------


def test_detokenizer_holds_split_characters(any_tokenizer: Tokenizer) -> None:
    split_found = False
    for text in ["你好世界", "模型在", "🙂🚀👍🏽", "naïve café", "€ Ça 👩‍💻"]:
        ids = any_tokenizer.encode(text)
        # The case under test: some token alone decodes to an unfinished character.
        split_found |= any("\ufffd" in any_tokenizer.decode([i]) for i in ids)
        chunks = stream(any_tokenizer, ids)
        assert "".join(chunks) == text
        assert not any("\ufffd" in chunk for chunk in chunks)
    assert split_found


def test_token_with_whole_and_partial_character(multibyte_bpe_tokenizer: Tokenizer) -> None:
    tok = multibyte_bpe_tokenizer
    # Find tokens that decode to a complete character followed by an unfinished one.
    mixed = [
        i
        for i in range(tok.vocab_size)
        if (s := tok.decode([i])).endswith("\ufffd") and s.rstrip("\ufffd")
    ]
    assert mixed, "the multibyte corpus should produce cross-character merges"
    texts = ["模型", "世界模型", "模型在服务器上", "🙂🚀👍🏽 naïve résumé"]
    # Some of these encode through such tokens (e.g. "模型在服务器上" as 模型�|�服�|�器�|�).
    assert any(set(tok.encode(t)) & set(mixed) for t in texts)
    for text in texts:
        chunks = stream(tok, tok.encode(text))
        assert "".join(chunks) == text
        assert not any("\ufffd" in chunk for chunk in chunks)


def test_detokenizer_matches_full_decode_randomly(any_tokenizer: Tokenizer) -> None:
    rng = random.Random(1234)
    extras = [*sorted(any_tokenizer.special_token_ids)]
    extras += [any_tokenizer.backend.token_to_id(t) for t in ("<think>", "</think>")]
    extras = [i for i in extras if i is not None]
    for _ in range(150):
        ids: list[int] = []
        # Concatenated encodings of pieces are sequences a model may emit but no encoder would.
        for _ in range(rng.randrange(1, 6)):
            ids += any_tokenizer.encode(random_text(rng, rng.randrange(1, 8)))
            if rng.random() < 0.4:
                ids.append(rng.choice(extras))
        chunks = stream(any_tokenizer, ids)
        assert "".join(chunks) == any_tokenizer.decode(ids)
        assert not any("\ufffd" in chunk for chunk in chunks)


def test_detokenizer_random_ids_byte_level(bpe_tokenizer: Tokenizer) -> None:
    # Byte-level decoding replaces invalid bytes locally, so even arbitrary ids must agree.
    rng = random.Random(99)
    for _ in range(300):
        ids = [rng.randrange(bpe_tokenizer.vocab_size) for _ in range(rng.randrange(1, 25))]
        assert "".join(stream(bpe_tokenizer, ids)) == bpe_tokenizer.decode(ids)


def test_detokenizer_skips_special_and_releases_invalid_bytes(sp_tokenizer: Tokenizer) -> None:
    backend = sp_tokenizer.backend
    ids = [
        backend.token_to_id("<s>"),
        *sp_tokenizer.encode("the model"),
        backend.token_to_id("</s>"),
    ]
    assert "".join(stream(sp_tokenizer, ids)) == "the model"
    detok = sp_tokenizer.detokenizer()
    assert detok.add(backend.token_to_id("<0xE4>")) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_detokenizer_cost_is_constant_per_token(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode(random_text(random.Random(5), 600))
    decoded_lengths: list[int] = []
    original = any_tokenizer.decode

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):  # type: ignore[override]
            decoded_lengths.append(len(ids))
            return original(ids, skip_special_tokens)

    counting = Counting(any_tokenizer.backend)
    text = "".join(stream(counting, ids))
    assert text == any_tokenizer.decode(ids)
    assert len(ids) > 500
    assert max(decoded_lengths) <= 16
    assert sum(decoded_lengths) <= 12 * len(ids)


# --- stop strings ---------------------------------------------------------------------------


def test_stop_spanning_chunks() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("P tail") == ("", True)
    assert matcher.matched == "STOP"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_held_text_released_when_decided() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("AR") == ("STAR", False)
    assert matcher.feed("x S") == ("x ", False)
    assert matcher.flush() == "S"
    assert not matcher.stopped


def test_stop_at_start_and_multiple_stops() -> None:
    assert StopMatcher(["\n\n", "END"]).feed("END of it") == ("", True)
    matcher = StopMatcher(["abcd", "bc", "zz"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("cd") == ("a", True)  # "bc" completes before "abcd" would
    assert matcher.matched == "bc"
    assert StopMatcher(["", "q"]).stops == ["q"]
    assert StopMatcher([]).feed("anything") == ("anything", False)


def first_stop_reference(text: str, stops: list[str]) -> str | None:
    """The text before the stop that completes first, by brute force; None if none does."""
    for end in range(len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(len(s) for s in ending)]
    return None


def test_stop_matcher_random_chunking() -> None:
    rng = random.Random(7)
    for _ in range(400):
        text = "".join(rng.choice("abcx") for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 5))) for _ in range(3)]
        matcher, out, fed, stopped = StopMatcher(stops), "", 0, False
        while fed < len(text) and not stopped:
            step = rng.randrange(1, 6)
            chunk, stopped = matcher.feed(text[fed : fed + step])
            out, fed = out + chunk, min(fed + step, len(text))
            if not stopped:
                assert fed - len(out) <= max(map(len, stops)) - 1  # bounded hold-back
        expected = first_stop_reference(text, stops)
        assert stopped == (expected is not None)
        if stopped:
            assert out == expected
        else:
            assert out + matcher.flush() == text
