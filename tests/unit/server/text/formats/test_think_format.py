"""Tests for server/text/formats/think.py and reasoning_base.py: reasoning split from content."""

from __future__ import annotations

import itertools
import random

import pytest

from moeserve.server.text.formats import detect_reasoning
from moeserve.server.text.formats.reasoning_base import ReasoningFormat
from moeserve.server.text.formats.think import ThinkFormat


class BarThink(ReasoningFormat):
    """A format with other markers, as the next families bring."""

    name = "bar_think"
    START = "<|think|>"
    END = "<|/think|>"


def run(
    chunks: list[str], fmt: type[ReasoningFormat] = ThinkFormat, **kwargs: object
) -> tuple[str, str]:
    parser = fmt(**kwargs)  # type: ignore[arg-type]
    reasoning, content = "", ""
    for chunk in [*chunks, None]:
        r, c = parser.feed(chunk) if chunk is not None else parser.finish()
        reasoning, content = reasoning + r, content + c
    return reasoning, content


def every_chunking_agrees(text: str, **kwargs: object) -> tuple[str, str]:
    """Split at every one or two positions, char by char and randomly; all match one-shot."""
    expected = run([text], **kwargs)
    n = len(text)
    splits = [[text[:i], text[i:]] for i in range(n + 1)] + [list(text)]
    splits += [[text[:i], text[i:j], text[j:]] for i, j in itertools.combinations(range(1, n), 2)]
    rng = random.Random(n)
    for _ in range(40 if n > 2 else 0):
        cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(2, 10))))
        splits.append([text[a:b] for a, b in itertools.pairwise([0, *cuts, n])])
    for chunks in splits:
        assert run(chunks, **kwargs) == expected, chunks
    return expected


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        (
            "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
            "\nLet me think.\n",
            "The answer is 4.",
        ),
        ("\n <think>x < y</think> y", "x < y", "y"),
        ("<think></think>\n\nHi", "", "Hi"),
        ("<think>a</think>b <think>c</think>", "a", "b <think>c</think>"),  # only the first
        ("Just an answer.", "", "Just an answer."),
        ("Answer first <think>then this</think>", "", "Answer first <think>then this</think>"),
        ("<think>unfinished </thi", "unfinished </thi", ""),
        ("<thi", "", "<thi"),
        ("  \n", "", "  \n"),
        ("<think>r</think>\n\n", "r", ""),  # separating whitespace with no content after it
        ("<think>你好 🙂</think>é", "你好 🙂", "é"),
        ("<think><think></think></think>", "<think>", "</think>"),
    ],
)
def test_opening_tag_in_the_output(text: str, reasoning: str, content: str) -> None:
    assert every_chunking_agrees(text) == (reasoning, content)


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("Hmm, 2+2.\n</think>\n\n4", "Hmm, 2+2.\n", "4"),
        ("</think>4", "", "4"),
        ("still thinking </", "still thinking </", ""),
        ("<think>x</think>y", "<think>x", "y"),
    ],
)
def test_generation_starting_inside_the_block(text: str, reasoning: str, content: str) -> None:
    assert every_chunking_agrees(text, starts_inside=True) == (reasoning, content)


def test_other_markers() -> None:
    assert every_chunking_agrees("<|think|>r<|/think|>c", fmt=BarThink) == ("r", "c")
    assert every_chunking_agrees("<think>r</think>c", fmt=BarThink) == ("", "<think>r</think>c")


def test_minimal_hold_back() -> None:
    parser = ThinkFormat()
    assert parser.feed("\n<th") == ("", "")  # could still open a block
    assert parser.feed("ink>abc</") == ("abc", "")
    assert parser.feed("x") == ("</x", "")  # not the closing tag after all
    assert parser.feed("</think>") == ("", "")
    assert parser.feed("\n") == ("", "")
    assert parser.feed("Hi") == ("", "Hi")
    assert parser.feed(" <think>") == ("", " <think>")
    assert parser.finish() == ("", "")
    with pytest.raises(RuntimeError):
        parser.feed("more")

    plain = ThinkFormat()
    assert plain.feed("Hello") == ("", "Hello")  # decided at once: no tag can follow


def test_in_reasoning_flag() -> None:
    parser = ThinkFormat(starts_inside=True)
    assert parser.in_reasoning
    parser.feed("x</think>")
    assert not parser.in_reasoning


def test_empty_marker_is_refused() -> None:
    class Empty(ReasoningFormat):
        name, START, END = "empty", "", "</x>"

    with pytest.raises(ValueError, match="'empty'"):
        Empty()


QWEN3_LIKE = "{%- if enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"


@pytest.mark.parametrize(
    ("template", "prompt", "vocab", "expected"),
    [
        (None, "<|im_start|>assistant\n", {}, None),
        ("{{ messages }}", "<|im_start|>assistant\n<think>\n", {}, None),
        (None, "<|im_start|>assistant\n", {"<think>": 7}, ("think", False)),
        (QWEN3_LIKE, "<|im_start|>assistant\n", {}, ("think", False)),
        (QWEN3_LIKE, "assistant\n<think>\n\n</think>\n\n", {}, ("think", False)),
        (QWEN3_LIKE, "<|im_start|>assistant\n<think>\n", {}, ("think", True)),
        (QWEN3_LIKE, "user: what is <think>?\nassistant\n", {}, ("think", False)),
    ],
)
def test_detect_reasoning(
    template: str | None, prompt: str, vocab: dict, expected: tuple | None
) -> None:
    assert detect_reasoning(template, prompt, vocab) == expected
