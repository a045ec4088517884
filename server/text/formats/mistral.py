r"""The "mistral" tool-call format: ``[TOOL_CALLS]`` and a JSON array of calls, or ``NAME[ARGS]{}``.

Mistral's v3 tokenizers (Mistral-7B-Instruct-v0.3, Mixtral-8x22B-Instruct-v0.1) write
``[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}, ...]``; the v11 and later ones
(Mistral Small 3.2, Magistral, Devstral) write each call as ``[TOOL_CALLS]NAME[ARGS]{...}``,
optionally ``[TOOL_CALLS]NAME[CALL_ID]ID[ARGS]{...}``. The parser reads both; the constraint
grammar writes the v3 array, which is what the templates detected here render.

It does not know the tokens (``[TOOL_CALLS]`` is a control token of those tokenizers; the
server keeps its text, see ``MARKERS``), call ids (a model's ``"id"`` is ignored; the server
numbers calls its own way), or HTTP, and it does not write the v11 form in constrained output.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from typing import Any

from moeserve.server.text.formats.grammar_writer import GrammarWriter
from moeserve.server.text.formats.qwen import QwenFormat
from moeserve.server.text.formats.tool_base import (
    MAX_PARALLEL_CALLS,
    MalformedCallError,
    ToolCall,
    decode,
    skip_ws,
)

_ARGS = "[ARGS]"
_CALL_ID = "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")


class MistralFormat(QwenFormat):
    """`[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` or `[TOOL_CALLS]NAME[ARGS]{...}`.

    Detected from a template that writes `[TOOL_CALLS]`. In the array form each element is
    one call, read as the qwen format reads its call object (arguments streamed as generated,
    "id" and other keys ignored, arguments given as a JSON string decoded); elements that
    completed stay calls when a later one turns out malformed, and the malformed rest goes
    back to content after a `[TOOL_CALLS]`. An array the stream ends without closing still
    yields the calls it closed. In the v11 form a call ends where its arguments object does.
    """

    name = "mistral"
    START = "[TOOL_CALLS]"
    END = "[TOOL_CALLS]"  # no closing marker: a call ends where its JSON ends
    MARKERS = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
    CALL_SEPARATOR = ", "  # between elements of the array in constrained output

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """A template that writes `[TOOL_CALLS]`."""
        return cls.START in template

    @classmethod
    def call_grammar(cls, g: GrammarWriter, i: int, name: str, fn: dict[str, Any]) -> str:
        """One array element: ``{"name": NAME, "arguments": ARGS}`` (compact JSON)."""
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        args = g.json(f"args_{i}", fn["parameters"], not fn.get("strict", False))
        return g.rule(f"call_{i}", f"{g.literal(head)} {args} {g.literal('}')}")

    @classmethod
    def grammar(
        cls, g: GrammarWriter, functions: list[tuple[str, dict[str, Any]]], parallel: bool
    ) -> str:
        """``[TOOL_CALLS] [`` one element (up to four, ``", "`` between them) ``]``, then EOS."""
        alternatives = [cls.call_grammar(g, i, name, fn) for i, (name, fn) in enumerate(functions)]
        separator = g.literal(cls.CALL_SEPARATOR)
        repeat = f" ({separator} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else ""
        opening = f"{g.mark(cls.START)} {g.literal(' [')}"
        start = f"start: {opening} call{repeat} {g.literal(']')}"
        return g.lark([start, "call: " + " | ".join(alternatives)])

    def _reset_call(self) -> None:
        super()._reset_call()
        self._form = ""  # "array" or "args", once the text after [TOOL_CALLS] tells

    def _scan(self, eof: bool) -> bool:
        if not self._form and not self._choose_form():
            return False
        while True:
            if self._value is not None:
                if not self._read_value():
                    return False
                if self._form == "args" and self._state == "next":
                    return True  # the arguments object closed the call
                continue
            pos = self._pos = skip_ws(self._buf, self._pos)
            if pos == len(self._buf):
                # An array the stream cut after a closed element still holds that call.
                return eof and self._state == "after"
            if self._state == "after":
                if self._buf[pos] == "]":
                    self._pos = pos + 1
                    return True
                if self._buf[pos] != ",":
                    raise MalformedCallError("expected ',' or ']' after an array element")
                self._next_element(pos)
                continue
            self._pos = pos + 1
            self._expect(self._buf[pos], pos)

    def _choose_form(self) -> bool:
        """Read what follows `[TOOL_CALLS]`: `[` opens the array, a name the v11 form."""
        pos = skip_ws(self._buf, self._pos)
        if pos == len(self._buf):
            return False
        if self._buf[pos] == "[":
            self._form, self._pos = "array", pos + 1
            return True
        match = _NAME.match(self._buf, pos)
        assert match is not None  # the pattern matches the empty string
        rest = self._buf[match.end() :]
        tag = next((t for t in (_ARGS, _CALL_ID) if rest.startswith(t)), None)
        if tag is None:
            if any(t.startswith(rest) for t in (_ARGS, _CALL_ID)):
                return False  # the name or its tag is still coming
            raise MalformedCallError("no '[' and no NAME[ARGS] after [TOOL_CALLS]")
        if not match.group():
            raise MalformedCallError("empty function name")
        after = match.end() + len(tag)
        if tag == _CALL_ID:
            found = self._buf.find(_ARGS, after)
            if found < 0:
                return False
            after = found + len(_ARGS)
        self._start(match.group())
        self._form, self._pos = "args", after
        self._seen.add("name")
        self._key, self._state = "arguments", "value"
        return True

    def _next_element(self, comma: int) -> None:
        """Keep the closed element as a call and go on with the next one in the same array."""
        if self._call_index is None:
            raise MalformedCallError("an array element without a function name")
        if not self._call_args:
            self._args("{}")
        if not isinstance(decode(self._call_args), dict):
            raise MalformedCallError("arguments are not a JSON object")
        self._calls.append(ToolCall(self._call_id, self._call_name, self._call_args))
        # What is already a call leaves the buffer; should a later element fail, the text from
        # this comma on goes back to content.
        self._buf, self._pos, self._lead_ws = self._buf[comma:], 1, ""
        self._call_index, self._call_name, self._call_args = None, "", ""
        form = self._form
        super()._reset_call()
        self._form = form


FORMAT = MistralFormat  # what the registry (formats/__init__.py) lists
