"""Text formats a model writes: tool-call markup and reasoning blocks, one class per format.

Each format is one class in one file that owns all of it: how to recognise it from the chat
template and the vocabulary, its markers, the streaming parser of one response and, for
tool calls, the grammar of its markup for ``tool_choice`` required or named. The registry
below lists them; the order is the detection order (the first format that recognises a
template wins) and the names are the choices of the ``tool_parser`` setting. Adding a format
is one new file (whose ``FORMAT`` names its class) plus its module's name in one line here.

A tool-call format subclasses ``tool_base.ToolFormat`` and a reasoning format
``reasoning_base.ReasoningFormat``; each format's module docstring shows its markup. A tool-call
format whose markup also carries reasoning (harmony's channels) splits it itself and runs alone
(``ToolFormat.SPLITS_REASONING``, described in ``tool_base``).

This package knows strings and token texts. It does not know token ids, sampling, HTTP or the
engine; the grammar helpers it writes with live in ``server/engine/grammar.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Container
from typing import Any, TypeVar

from moeserve.server.text.formats.reasoning_base import ReasoningFormat
from moeserve.server.text.formats.tool_base import (
    MAX_PARALLEL_CALLS,
    ContentDelta,
    Event,
    ReasoningDelta,
    ToolCall,
    ToolCallArgs,
    ToolCallStart,
    ToolFormat,
    partial_marker_len,
)

__all__ = [
    "DEFAULT_TOOL_FORMAT",
    "MARKERS",
    "MAX_PARALLEL_CALLS",
    "REASONING_FORMATS",
    "TOOL_FORMATS",
    "TOOL_FORMAT_NAMES",
    "ContentDelta",
    "Event",
    "ReasoningDelta",
    "ReasoningFormat",
    "ToolCall",
    "ToolCallArgs",
    "ToolCallStart",
    "ToolFormat",
    "detect_reasoning",
    "detect_tool_format",
    "partial_marker_len",
    "reasoning_format",
    "tool_format",
]

_F = TypeVar("_F")


def _registered(base: type[_F], *modules: str) -> tuple[type[_F], ...]:
    """The ``FORMAT`` class of each named module of this package, in the order given."""
    formats = []
    for module in modules:
        fmt = importlib.import_module(f"{__name__}.{module}").FORMAT
        if not (isinstance(fmt, type) and issubclass(fmt, base)):
            raise TypeError(f"{__name__}.{module}.FORMAT is not a {base.__name__}")
        formats.append(fmt)
    return tuple(formats)


# Detection order: the first format whose `detect` accepts the template wins
# (hermes_parameters before qwen, whose rule, "tojson", also matches its templates).
TOOL_FORMATS = _registered(
    ToolFormat,
    "glm45",
    "qwen_xml",
    "hermes_parameters",
    "qwen",
    "harmony",
    "deepseek_v31",
    "mistral",
    "kimi_k2",
    "minimax_m2",
)
REASONING_FORMATS = _registered(ReasoningFormat, "think")

TOOL_FORMAT_NAMES: tuple[str, ...] = tuple(f.name for f in TOOL_FORMATS)
DEFAULT_TOOL_FORMAT = "qwen"  # what the ChatML fallback template writes
# Every format's markup: the parsers must see it even where it is a special token.
MARKERS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [m for f in TOOL_FORMATS for m in f.MARKERS]
        + [m for f in REASONING_FORMATS for m in f.markers()]
    )
)


def tool_format(name: str) -> type[ToolFormat]:
    """The tool-call format class of a name.

    Args:
        name: A name from `TOOL_FORMAT_NAMES` (the setting, or what detection found).

    Returns:
        The class; an instance of it parses one response.

    Raises:
        ValueError: The name is unknown; the message lists the known ones.
    """
    for fmt in TOOL_FORMATS:
        if fmt.name == name:
            return fmt
    known = ", ".join(sorted(TOOL_FORMAT_NAMES))
    raise ValueError(f"unknown tool-call format {name!r}; known: {known}")


def reasoning_format(name: str) -> type[ReasoningFormat]:
    """The reasoning format class of a name (as `detect_reasoning` returns it).

    Args:
        name: A reasoning format's name.

    Returns:
        The class.

    Raises:
        ValueError: The name is unknown.
    """
    for fmt in REASONING_FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown reasoning format {name!r}")


def detect_tool_format(
    chat_template: str | None,
    tokenizer_config: dict[str, Any] | None,
    vocabulary: Container[str] = (),
) -> str | None:
    """Tell from a model's chat template which tool-call format it writes.

    Args:
        chat_template: The template in use, or None when the model ships none in the given
            place; then the templates in `tokenizer_config["chat_template"]` are read, and
            with none there either moeserve's ChatML fallback is in use, which writes
            `DEFAULT_TOOL_FORMAT`.
        tokenizer_config: The parsed `tokenizer_config.json`, or None.
        vocabulary: Token texts of the model's tokenizer.

    Returns:
        The first format in `TOOL_FORMATS` that recognises the template, or None when the
        template writes no tool calls or uses a format none here reads.
    """
    templates = [chat_template] if chat_template else []
    if not templates and tokenizer_config:
        raw = tokenizer_config.get("chat_template")
        if isinstance(raw, str):
            templates = [raw]
        elif isinstance(raw, list):
            templates = [t.get("template", "") for t in raw if isinstance(t, dict)]
    if not templates:
        return DEFAULT_TOOL_FORMAT
    text = "\n".join(t for t in templates if isinstance(t, str))
    return next((f.name for f in TOOL_FORMATS if f.detect(text, vocabulary)), None)


def detect_reasoning(
    chat_template: str | None,
    rendered_generation_prompt: str = "",
    vocabulary: Container[str] = (),
) -> tuple[str, bool] | None:
    """Tell which reasoning format a model writes and whether generation starts inside a block.

    Args:
        chat_template: The template in use (None: the ChatML fallback, which has no markers).
        rendered_generation_prompt: A prompt rendered with the generation prompt, with the
            request's template variables (see `ReasoningFormat.starts_inside`).
        vocabulary: Token texts (e.g. the tokenizer's vocabulary dict).

    Returns:
        (format name, starts_inside) of the first format in `REASONING_FORMATS` that
        recognises the template or the vocabulary; None when none does.
    """
    for fmt in REASONING_FORMATS:
        if fmt.detect(chat_template, vocabulary):
            return fmt.name, fmt.starts_inside(rendered_generation_prompt)
    return None
