"""The "think" reasoning format: a leading ``<think>`` ... ``</think>`` block.

Written by Qwen3, GLM-4.5, DeepSeek-R1 and most open reasoning models. Qwen3's template opens
the block in the generation prompt unless ``enable_thinking`` is false, so generation may
start inside it; `ReasoningFormat.starts_inside` reads that from the rendered prompt.
"""

from __future__ import annotations

from moeserve.server.text.formats.reasoning_base import ReasoningFormat


class ThinkFormat(ReasoningFormat):
    """`<think>` ... `</think>`, detected from the template or a `<think>` token."""

    name = "think"
    START = "<think>"
    END = "</think>"


FORMAT = ThinkFormat  # what the registry (formats/__init__.py) lists
