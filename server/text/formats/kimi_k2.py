"""The "kimi_k2" tool-call format of Kimi-K2 (Instruct, Thinking, K2.5): calls between markers.

Kimi-K2's templates write an assistant's calls as one section (one line, cut here)::

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0
    <|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

with the calls chained inside it and nothing between them. Each ``<|tool_call_begin|>`` ...
``<|tool_call_end|>`` is one call; the section's markers are markup (``SECTION``). Every marker
is a special token of Kimi's tokenizer. The text before ``<|tool_call_argument_begin|>`` is
the call's id, ``functions.NAME:IDX``: the templates write a call's ``id`` there verbatim and
answer it in the tool result (``## Return of <id>``), and the model counts IDX up across the
conversation.

Ids: the model's own id is the call's id (as vLLM and SGLang do), so a client that sends the
call back gets the exact prompt text the model was trained on, and its tool result names it.
The function name is the id without its ``functions.`` prefix (when present) and its ``:IDX``
suffix. An id that repeats one already given in the same response gets the next free IDX, so
ids stay unique within a response. An id without ``:IDX`` makes the call malformed.

Reasoning (Kimi-K2-Thinking, K2.5: ``<think>`` ... ``</think>`` before the answer, opened by
K2.5's generation prompt unless its ``thinking`` variable is false) is the "think" format's and
is removed before this parser sees the text.

Not read: the singular ``<|tool_call_section_begin|>`` / ``<|tool_call_section_end|>`` that
vLLM also accepts are not markers here; as special tokens they are dropped from the text, so a
call inside them still parses. Nor are calls checked against the request's tools.
"""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Any

from moeserve.server.text.formats.grammar_writer import GrammarWriter
from moeserve.server.text.formats.tool_base import (
    MAX_PARALLEL_CALLS,
    MalformedCallError,
    ToolCallStart,
    ToolFormat,
    partial_marker_len,
    skip_ws,
)

_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
_ID_MAX = 256  # an id is short; more text before the argument marker is not a call
_PREFIX = "functions."
# functions.NAME:IDX (the prefix optional); NAME is everything up to the last ":digits".
_ID = re.compile(r"(?P<name>[^\s<>\"'{}]+):(?P<index>\d+)")
_INDEX_DIGITS = 4  # the constraint grammar lets the model write up to this many IDX digits


class KimiK2Format(ToolFormat):
    """`<|tool_call_begin|>ID<|tool_call_argument_begin|>ARGS<|tool_call_end|>` in a section.

    Detected from a template that writes ``<|tool_call_argument_begin|>``, or from one that
    declares tools Kimi's way (``tool_declare``) for a vocabulary holding the section marker
    (Kimi-K2-Instruct's first template rendered no calls). The arguments stream as generated,
    without the whitespace around them. `ToolCallStart` carries the model's id (see the
    module docstring). The grammar writes one section holding the calls back to back, each id
    ``functions.NAME:`` followed by digits the model chooses.
    """

    name = "kimi_k2"
    START = "<|tool_call_begin|>"
    END = "<|tool_call_end|>"
    SECTION = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")
    MARKERS = (*SECTION, START, _ARGUMENT_BEGIN, END)

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """A template writing Kimi's call markup, or declaring tools Kimi's way (see above)."""
        if _ARGUMENT_BEGIN in template:
            return True
        return "tool_declare" in template and cls.SECTION[0] in vocabulary

    @classmethod
    def call_grammar(cls, g: GrammarWriter, i: int, name: str, fn: dict[str, Any]) -> str:
        """``<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS`` + end."""
        args = g.json(f"args_{i}", fn["parameters"], not fn.get("strict", False))
        index = f"/[0-9]{{1,{_INDEX_DIGITS}}}/"
        head = [g.mark(cls.START), g.literal(f"{_PREFIX}{name}:"), index, g.mark(_ARGUMENT_BEGIN)]
        return g.rule(f"call_{i}", " ".join([*head, args, g.mark(cls.END)]))

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

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._used_ids: set[str] = set()
        self._model_id = ""  # the open call's id, as `_start` hands it out

    def _reset_call(self) -> None:
        self._state = "id"
        self._pending = ""  # trailing whitespace of the arguments, held until text follows

    def _scan(self, eof: bool) -> bool:
        if self._state == "id" and not self._read_id():
            return False
        # The arguments run to the first marker: the end, or one that cannot be in them. Up to
        # there they stream, however the text was cut, and only then is the call judged.
        buf, markers = self._buf, (self.END, self.START, _ARGUMENT_BEGIN)
        found = [(at, m) for m in markers if (at := buf.find(m, self._pos)) >= 0]
        end, marker = min(found) if found else (-1, "")
        held = max(partial_marker_len(buf, m) for m in markers)
        stop = end if end >= 0 else max(self._pos, len(buf) - held)
        text = self._pending + buf[self._pos : stop]
        if not self._call_args:
            text = text.lstrip()
        body = text.rstrip()
        self._pending = text[len(body) :]
        self._args(body)
        if marker and marker != self.END:
            raise MalformedCallError("a call began inside the arguments")
        self._pos = stop if end < 0 else end + len(self.END)
        return end >= 0

    def _read_id(self) -> bool:
        """Read the id up to ``<|tool_call_argument_begin|>``; False while it is not all here."""
        sep = self._buf.find(_ARGUMENT_BEGIN, self._pos)
        region = self._buf[self._pos : len(self._buf) if sep < 0 else sep]
        if self.END in region or self.START in region:
            raise MalformedCallError("no <|tool_call_argument_begin|> after the call id")
        if sep < 0:
            if len(region) > _ID_MAX:
                raise MalformedCallError("no <|tool_call_argument_begin|> after the call id")
            return False
        match = _ID.fullmatch(region.strip())
        if match is None:
            raise MalformedCallError(f"not a call id (functions.NAME:IDX): {region[:40]!r}")
        name = match["name"].removeprefix(_PREFIX)
        if not name:
            raise MalformedCallError("the call id names no function")
        prefix = match["name"][: len(match["name"]) - len(name)]
        index, call_id = int(match["index"]), match.group()
        while call_id in self._used_ids:  # unique within the response
            index += 1
            call_id = f"{prefix}{name}:{index}"
        self._model_id = call_id
        self._start(name)
        self._pos = skip_ws(self._buf, sep + len(_ARGUMENT_BEGIN))
        self._state = "args"
        return True

    def _start(self, name: str) -> None:
        # The base announces the call with a fresh `call_...` id; Kimi's calls keep the model's.
        super()._start(name)
        start = self._events[-1]
        assert isinstance(start, ToolCallStart) and start.index == self._call_index
        self._call_id = start.id = self._model_id
        self._used_ids.add(self._model_id)


FORMAT = KimiK2Format  # what the registry (formats/__init__.py) lists
