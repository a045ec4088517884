r"""The "qwen" tool-call format: ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``.

Written by Qwen / Hermes-style templates and moeserve's ChatML fallback
(``server/text/chat_template.py``). The arguments JSON is streamed as it is generated.
"""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any, ClassVar

from moeserve.server.text.formats.grammar_writer import GrammarWriter
from moeserve.server.text.formats.tool_base import MalformedCallError, ToolFormat, decode, skip_ws


class _ValueScanner:
    """Finds where one JSON value ends in text that arrives piecewise; does not validate it.

    Strings (with escapes) are skipped, so braces and quotes inside them do not count. A
    scalar (number, true, ...) ends just before the first delimiter after it.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False

    def advance(self, text: str, pos: int) -> tuple[int, bool]:
        """Scan `text[pos:]`; returns (position reached, whether the value is complete)."""
        for i in range(pos, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1, True
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                if self.depth == 0:  # the enclosing object's end closes a scalar
                    return i, True
                self.depth -= 1
                if self.depth == 0:
                    return i + 1, True
            elif self.depth == 0 and ch in ", \t\r\n":
                return i, True
        return len(text), False


class QwenFormat(ToolFormat):
    """The "qwen" format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

    Detected from a template that writes `<tool_call>` with a JSON object in it (an
    `"arguments"` key or `tojson`) and not Qwen3-Coder's `<function=...>` XML. The parser
    streams the arguments object character for character as generated, exactly as the model
    wrote it. Also accepted: "arguments" before "name" (held until the name is known),
    "parameters" for "arguments", arguments given as a JSON string holding an object
    (decoded), no arguments at all (`{}`), other keys (ignored) and, at the end of the
    stream only, a closed object whose `</tool_call>` never came. The grammar writes
    `ARGUMENTS_KEY`.
    """

    name = "qwen"
    ARGUMENTS_KEY: ClassVar[str] = "arguments"  # the key constrained output writes
    _ARG_KEYS: ClassVar[tuple[str, ...]] = ("arguments", "parameters")  # keys the parser reads

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """A template writing `<tool_call>` with a JSON object (see the class docstring)."""
        if "<tool_call>" not in template or "<function=" in template:
            return False
        return '"arguments"' in template or "tojson" in template

    @classmethod
    def call_grammar(cls, g: GrammarWriter, i: int, name: str, fn: dict[str, Any]) -> str:
        """``<tool_call>`` NL ``{"name": NAME, "<ARGUMENTS_KEY>": ARGS}`` NL ``</tool_call>``."""
        key = json.dumps(cls.ARGUMENTS_KEY)
        head = '\n{"name": ' + json.dumps(name, ensure_ascii=False) + f", {key}: "
        args = g.json(f"args_{i}", fn["parameters"], not fn.get("strict", False))
        body = f"{g.literal(head)} {args} {g.literal(chr(125) + chr(10))}"  # "}\n"
        return g.rule(f"call_{i}", f"{g.mark(cls.START)} {body} {g.mark(cls.END)}")

    def _reset_call(self) -> None:
        self._state = "open"
        self._value: _ValueScanner | None = None
        self._value_start = 0
        self._key: str | None = None
        self._seen: set[str] = set()
        self._early_args = ""  # arguments read before the name
        self._reading_key = False

    def _scan(self, eof: bool) -> bool:
        while True:
            if self._value is not None:
                if not self._read_value():
                    return False
                continue
            pos = self._pos = skip_ws(self._buf, self._pos)
            if self._state == "after":
                rest = self._buf[pos:]
                if rest.startswith(self.END):
                    self._pos = pos + len(self.END)
                    return True
                if self.END.startswith(rest):
                    if not eof:
                        return False
                    # A closed call object is a call even if the stream cut its end tag off.
                    self._pos = len(self._buf)
                    return True
                raise MalformedCallError("text between the call object and its end tag")
            if pos == len(self._buf):
                return False
            self._pos = pos + 1
            self._expect(self._buf[pos], pos)

    def _expect(self, ch: str, pos: int) -> None:
        state = self._state
        if state == "open" and ch == "{":
            self._state = "first_key"
        elif state in ("first_key", "key") and ch == '"':
            self._begin_value(pos, reading_key=True)
        elif state in ("first_key", "next") and ch == "}":
            self._state = "after"
        elif state == "colon" and ch == ":":
            self._state = "value"
        elif state == "value":
            self._begin_value(pos, reading_key=False)
        elif state == "next" and ch == ",":
            self._state = "key"
        else:
            raise MalformedCallError(f"unexpected {ch!r} in the call object ({state})")

    def _begin_value(self, pos: int, reading_key: bool) -> None:
        self._value = _ValueScanner()
        self._value_start = self._pos = pos
        self._reading_key = reading_key

    def _streams_args(self) -> bool:
        # Only an object is streamed as it comes; a string must be decoded whole first.
        return (
            not self._reading_key
            and self._key in self._ARG_KEYS
            and self._buf[self._value_start] == "{"
        )

    def _read_value(self) -> bool:
        assert self._value is not None
        end, done = self._value.advance(self._buf, self._pos)
        if self._streams_args():
            self._args(self._buf[self._pos : end])  # dropped while the name is unknown
        self._pos = end
        if not done:
            return False
        self._value = None
        text = self._buf[self._value_start : end]
        if self._reading_key:
            self._key = decode(text)
            if self._key in self._seen or (
                self._key in self._ARG_KEYS and self._seen & set(self._ARG_KEYS)
            ):
                raise MalformedCallError(f"duplicate key {self._key!r}")
            self._seen.add(self._key)
            self._state = "colon"
        else:
            self._take_member(text)
            self._state = "next"
        return True

    def _take_member(self, text: str) -> None:
        value = decode(text)
        if self._key == "name":
            if not isinstance(value, str) or not value:
                raise MalformedCallError("the function name is not a non-empty string")
            self._start(value)
            self._args(self._early_args)
        elif self._key in self._ARG_KEYS:
            if isinstance(value, str):  # some models write the arguments as a JSON string
                text = value
                value = decode(text)
            if not isinstance(value, dict):
                raise MalformedCallError("arguments are not a JSON object")
            if self._call_index is None:
                self._early_args = text
            elif not self._streams_args():
                self._args(text)


FORMAT = QwenFormat  # what the registry (formats/__init__.py) lists
