"""The "deepseek_v31" tool-call format of DeepSeek-V3.1: name and JSON arguments between markers.

DeepSeek-V3.1's template writes an assistant's calls as one section (one line, cut here)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}
    <｜tool▁call▁end｜><｜tool▁calls▁end｜>

with the calls chained inside it, no separator between them (``{"city": ...}`` is the
arguments' JSON text exactly as the client sent it). Each ``<｜tool▁call▁begin｜>`` ...
``<｜tool▁call▁end｜>`` is one call; the section's markers are markup (``SECTION``). Its
reasoning (``<think>`` ... ``</think>``, with the block opened by the generation prompt when the
template's ``thinking`` variable is true) is the "think" format's and is removed before this
parser sees the text.

DeepSeek-V3 and R1 wrote ``function<｜tool▁sep｜>NAME`` and the arguments in a fenced json
block; that older layout is neither detected nor parsed here.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from moeserve.server.text.formats.grammar_writer import GrammarWriter
from moeserve.server.text.formats.tool_base import (
    MAX_PARALLEL_CALLS,
    MalformedCallError,
    ToolFormat,
    partial_marker_len,
    skip_ws,
)

_SEP = "<｜tool▁sep｜>"
_NAME_MAX = 256  # a function name is short; more text before the separator is not a call


class DeepSeekV31Format(ToolFormat):
    """`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` inside a calls section.

    Detected from a template that writes ``<｜tool▁sep｜>`` without V3's fenced json. The
    arguments stream as generated, without the whitespace around them; the name must be one
    word. The grammar writes one section holding the calls back to back.
    """

    name = "deepseek_v31"
    START = "<｜tool▁call▁begin｜>"
    END = "<｜tool▁call▁end｜>"
    SECTION = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
    MARKERS = (*SECTION, START, _SEP, END)

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """A template writing ``<｜tool▁sep｜>`` calls without V3's fenced json block."""
        return _SEP in template and "```json" not in template

    @classmethod
    def call_grammar(cls, g: GrammarWriter, i: int, name: str, fn: dict[str, Any]) -> str:
        """``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>`` ARGS ``<｜tool▁call▁end｜>``."""
        args = g.json(f"args_{i}", fn["parameters"], not fn.get("strict", False))
        parts = [g.mark(cls.START), g.literal(name), g.mark(_SEP), args, g.mark(cls.END)]
        return g.rule(f"call_{i}", " ".join(parts))

    @classmethod
    def grammar(
        cls, g: GrammarWriter, functions: list[tuple[str, dict[str, Any]]], parallel: bool
    ) -> str:
        """One section of one call (up to `MAX_PARALLEL_CALLS` when parallel), then EOS."""
        alternatives = [cls.call_grammar(g, i, name, fn) for i, (name, fn) in enumerate(functions)]
        repeat = f"{{1,{MAX_PARALLEL_CALLS}}}" if parallel else ""
        opening, closing = (g.mark(m) for m in cls.SECTION)
        head = f"start: {opening} (call){repeat} {closing}"
        return g.lark([head, "call: " + " | ".join(alternatives)])

    def _reset_call(self) -> None:
        self._state = "name"
        self._pending = ""  # trailing whitespace of the arguments, held until text follows

    def _scan(self, eof: bool) -> bool:
        if self._state == "name" and not self._read_name():
            return False
        buf = self._buf
        end = buf.find(self.END, self._pos)
        if self.START in buf[self._pos : len(buf) if end < 0 else end]:
            raise MalformedCallError("a call began inside the arguments")
        stop = end if end >= 0 else len(buf) - partial_marker_len(buf, self.END)
        text = self._pending + buf[self._pos : stop]
        if not self._call_args:
            text = text.lstrip()
        body = text.rstrip()
        self._pending = text[len(body) :]
        self._args(body)
        self._pos = stop if end < 0 else end + len(self.END)
        return end >= 0

    def _read_name(self) -> bool:
        """Read the name up to ``<｜tool▁sep｜>``; False while it is not there yet."""
        sep = self._buf.find(_SEP, self._pos)
        region = self._buf[self._pos : len(self._buf) if sep < 0 else sep]
        if self.END in region or self.START in region:
            raise MalformedCallError("no <｜tool▁sep｜> after the function name")
        if sep < 0:
            if len(region) > _NAME_MAX:
                raise MalformedCallError("no <｜tool▁sep｜> after the function name")
            return False
        name = region.strip()
        if not name or any(c.isspace() or c in "<>{}\"'" for c in name):
            raise MalformedCallError(f"not a function name: {name[:40]!r}")
        self._start(name)
        self._pos = skip_ws(self._buf, sep + len(_SEP))
        self._state = "args"
        return True


FORMAT = DeepSeekV31Format  # what the registry (formats/__init__.py) lists
