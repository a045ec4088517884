"""Tests for server/text/formats/__init__.py: the registry, detection order, settings choices."""

from __future__ import annotations

import inspect
import re
import typing

import pytest

from moeserve.server.settings import DEFAULT_CONFIG, Settings
from moeserve.server.text.chat_template import CHATML_TEMPLATE
from moeserve.server.text.formats import (
    MARKERS,
    REASONING_FORMATS,
    TOOL_FORMAT_NAMES,
    TOOL_FORMATS,
    ToolFormat,
    detect_tool_format,
    reasoning_format,
    tool_format,
)
from moeserve.server.text.formats.glm45 import Glm45Format
from moeserve.server.text.formats.qwen import QwenFormat
from moeserve.server.text.formats.think import ThinkFormat
from tests.unit.server.text.formats.helpers import content_of, one_shot_equals_every_chunking

GLM_LIKE_TEMPLATE = (
    "{% for tc in m.tool_calls %}<tool_call>{{ tc.name }}\n{% for k, v in tc.arguments.items() %}"
    "<arg_key>{{ k }}</arg_key>\n<arg_value>{{ v }}</arg_value>\n{% endfor %}</tool_call>"
    "{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "config", "expected"),
    [
        (CHATML_TEMPLATE, None, "qwen"),
        (None, None, "qwen"),  # no template anywhere: the ChatML fallback is used
        (None, {"chat_template": [{"name": "default", "template": CHATML_TEMPLATE}]}, "qwen"),
        (GLM_LIKE_TEMPLATE, None, "glm45"),
        (None, {"chat_template": GLM_LIKE_TEMPLATE}, "glm45"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None, None),
        ("<tool_call>\n<function={{ tc.name }}>\n<parameter=x>", None, "qwen_xml"),
        ('{{- "[TOOL_CALLS] [" }}', None, "mistral"),
    ],
)
def test_detect_tool_format(
    template: str | None, config: dict | None, expected: str | None
) -> None:
    assert detect_tool_format(template, config) == expected


def test_lookup_by_name() -> None:
    assert tool_format("qwen") is QwenFormat and tool_format("glm45") is Glm45Format
    assert reasoning_format("think") is ThinkFormat
    with pytest.raises(ValueError, match=re.escape(", ".join(sorted(TOOL_FORMAT_NAMES)))):
        tool_format("llama")
    with pytest.raises(ValueError, match="'nope'"):
        reasoning_format("nope")


def test_every_format_is_complete_and_named_once() -> None:
    names = [f.name for f in TOOL_FORMATS]
    assert names == list(TOOL_FORMAT_NAMES) and len(set(names)) == len(names) and all(names)
    for fmt in TOOL_FORMATS:
        assert {fmt.START, fmt.END} <= set(fmt.MARKERS), fmt.name
        for method in ("detect", "call_grammar", "_reset_call", "_scan"):  # the abstract ones
            own = inspect.getattr_static(fmt, method)
            assert own is not inspect.getattr_static(ToolFormat, method), (fmt.name, method)
    assert [f.name for f in REASONING_FORMATS] == ["think"]


def test_markers_are_every_formats_markup() -> None:
    assert set(MARKERS) == {
        "<tool_call>",
        "</tool_call>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
        "<think>",
        "</think>",
        # harmony (gpt-oss)
        "<|start|>",
        "<|channel|>",
        "<|message|>",
        "<|constrain|>",
        "<|end|>",
        "<|call|>",
        "<|return|>",
        # deepseek_v31
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁sep｜>",
        "<｜tool▁call▁end｜>",
        # mistral
        "[TOOL_CALLS]",
        "[ARGS]",
        "[CALL_ID]",
        # kimi_k2
        "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>",
        "<|tool_call_argument_begin|>",
        "<|tool_call_end|>",
        # minimax_m2
        "<minimax:tool_call>",
        "</minimax:tool_call>",
        "<invoke name=",
        "</invoke>",
    }


def test_the_setting_offers_auto_and_every_format() -> None:
    choices = typing.get_args(Settings.model_fields["tool_parser"].annotation)
    assert choices == ("auto", *TOOL_FORMAT_NAMES)
    lines = DEFAULT_CONFIG.read_text().splitlines()
    key = next(i for i, line in enumerate(lines) if line.startswith("tool_parser ="))
    comment = []
    for line in reversed(lines[:key]):
        if not line.startswith("# "):
            break
        comment.insert(0, line[2:])
    words = set(re.findall(r"\w+", " ".join(comment)))
    assert {"auto", *TOOL_FORMAT_NAMES} <= words, comment


@pytest.mark.parametrize("fmt", TOOL_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("text", ["  \n", "", "héllo 🙂 < > <tool_cal l>"])
def test_plain_text_is_content(fmt, text: str) -> None:
    result = one_shot_equals_every_chunking(fmt, text)
    assert content_of(result) == text and result[1] == []


def test_the_registry_takes_each_module_format_and_checks_its_kind() -> None:
    from moeserve.server.text import formats

    assert formats.DEFAULT_TOOL_FORMAT in formats.TOOL_FORMAT_NAMES
    assert formats._registered(formats.ToolFormat, "qwen") == (formats.tool_format("qwen"),)
    with pytest.raises(TypeError, match=r"think\.FORMAT is not a ToolFormat"):
        formats._registered(formats.ToolFormat, "think")
