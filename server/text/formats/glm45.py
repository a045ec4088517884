"""The "glm45" tool-call format of GLM-4.5: a name line, then ``<arg_key>``/``<arg_value>`` pairs.

The arguments object is assembled from the pairs and streamed one pair at a time; in
constrained output a string value is raw text and any other its JSON, as the template writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from typing import Any

from moeserve.server.text.formats.grammar_writer import GrammarWriter, resolve_ref, with_defs
from moeserve.server.text.formats.tool_base import (
    MalformedCallError,
    ToolFormat,
    skip_ws,
    strict_json,
)


class Glm45Format(ToolFormat):
    """The "glm45" format: a name line, then `<arg_key>K</arg_key><arg_value>V</arg_value>` pairs.

    Detected from a template that writes `<arg_key>`. The parser builds the arguments object
    from the pairs and streams it one pair at a time: `{"K": V` when the first pair
    completes, `, "K2": V2` for each further one, `}` at `</tool_call>`. A value that parses
    as non-string JSON (number, true/false, null, object, array) is used as that JSON,
    exactly as written; anything else is a string. When `tools` is given, a parameter its
    schema types as "string" always stays a string (so "42" is not a number). GLM-4.5's
    tokenizer makes every marker a special token; the grammar then writes them as tokens.

    Args:
        tools: The request's OpenAI tool definitions, for the parameter types.
    """

    name = "glm45"
    MARKERS = (
        "<tool_call>",
        "</tool_call>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
    )
    _NAME = re.compile(r"[^\s<>\"'{}\[\],]*[ \t\r]*")

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """A template that writes `<arg_key>`."""
        return "<arg_key>" in template

    @classmethod
    def call_grammar(cls, g: GrammarWriter, i: int, name: str, fn: dict[str, Any]) -> str:
        """``<tool_call>NAME`` NL, then ``<arg_key>K</arg_key>`` NL ``<arg_value>V</arg_value>`` NL.

        Declared properties come in schema order, required ones mandatory; a string value is
        raw text, any other its JSON. Without declared properties: any keys, raw values.
        """
        params, lenient = fn["parameters"], not fn.get("strict", False)
        props = params.get("properties")
        if isinstance(props, dict) and (props or params.get("additionalProperties") is False):
            required, close_key = params.get("required", ()), g.mark("</arg_key>")
            pairs = [
                _pair(
                    g,
                    f"{g.literal(key)} {close_key}",
                    _value(g, f"v_{i}_{k}", schema, params, lenient),
                )
                + ("" if key in required else "?")
                for k, (key, schema) in enumerate(props.items())
            ]
        else:
            key = g.raw_until(f"k_{i}", "</arg_key>")
            pairs = [_pair(g, key, g.raw_until(f"v_{i}", "</arg_value>")) + "*"]
        call = f'{g.mark(cls.START)} {g.literal(name)} "\\n" {" ".join(pairs)}'
        return g.rule(f"call_{i}", f"{call} {g.mark(cls.END)}")

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._string_params = _string_params(tools or [])

    def _reset_call(self) -> None:
        self._state = "name"
        self._key = ""
        self._pairs = 0

    def _scan(self, eof: bool) -> bool:
        while True:
            if self._state == "name":
                if not self._read_name():
                    return False
            elif self._state in ("between", "key_done"):
                if not self._read_tag():
                    return False
                if self._state == "closed":
                    return True
            else:  # inside <arg_key> or <arg_value>, up to its closing tag
                close = "</arg_key>" if self._state == "key" else "</arg_value>"
                end = self._buf.find(close, self._pos)
                if end < 0:
                    return False
                text, self._pos = self._buf[self._pos : end], end + len(close)
                if self._state == "key":
                    if "<arg_" in text:
                        raise MalformedCallError("unclosed <arg_key>")
                    self._key, self._state = text.strip(), "key_done"
                else:
                    self._add_pair(text)
                    self._state = "between"

    def _read_name(self) -> bool:
        pos = skip_ws(self._buf, self._pos)
        match = self._NAME.match(self._buf, pos)
        assert match is not None  # the pattern matches the empty string
        if match.end() == len(self._buf):
            return False
        name = match.group().strip()
        if not name or self._buf[match.end()] not in "\n<":
            raise MalformedCallError("no function name line")
        self._pos = match.end()
        self._start(name)
        self._state = "between"
        return True

    def _read_tag(self) -> bool:
        pos = skip_ws(self._buf, self._pos)
        rest = self._buf[pos:]
        if self._state == "key_done":
            tags = {"<arg_value>": "value"}
        else:
            tags = {"<arg_key>": "key", self.END: "closed"}
        for tag, state in tags.items():
            if rest.startswith(tag):
                self._pos, self._state = pos + len(tag), state
                if state == "closed":
                    self._args("}" if self._pairs else "{}")
                return True
            if tag.startswith(rest):
                return False
        raise MalformedCallError(f"expected one of {list(tags)}")

    def _add_pair(self, raw: str) -> None:
        if "<arg_key>" in raw or "<arg_value>" in raw:
            raise MalformedCallError("unclosed argument tag")
        value = json.dumps(raw, ensure_ascii=False)
        if self._key not in self._string_params.get(self._call_name, ()):
            try:
                if not isinstance(strict_json(raw), str):
                    value = raw.strip()
            except ValueError:
                pass
        key = json.dumps(self._key, ensure_ascii=False)
        self._args(f"{', ' if self._pairs else '{'}{key}: {value}")
        self._pairs += 1


def _string_params(tools: list[dict[str, Any]]) -> dict[str, set[str]]:
    # Function name -> parameters whose schema type is "string" (alone or with "null").
    found: dict[str, set[str]] = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        props = parameters.get("properties") if isinstance(parameters, dict) else None
        names = set()
        for key, schema in (props or {}).items():
            kind = schema.get("type") if isinstance(schema, dict) else None
            kinds = set(kind) - {"null"} if isinstance(kind, list) else {kind}
            if kinds == {"string"}:
                names.add(key)
        found[function["name"]] = names
    return found


def _pair(g: GrammarWriter, key: str, value: str) -> str:
    return f'({g.mark("<arg_key>")} {key} "\\n" {g.mark("<arg_value>")} {value} "\\n")'


def _value(g: GrammarWriter, rule: str, schema: Any, root: dict[str, Any], lenient: bool) -> str:
    """One argument's value and its ``</arg_value>``."""
    target = resolve_ref(schema, root)
    if isinstance(target, dict) and target.get("type") == "string":
        choices = target.get("enum") or ([target["const"]] if "const" in target else None)
        if not choices or not all(isinstance(c, str) for c in choices):
            return g.raw_until(rule, "</arg_value>", target)
        return f"({' | '.join(g.literal(c) for c in choices)}) {g.mark('</arg_value>')}"
    sub = with_defs(schema, root)  # keep local $refs resolvable in the sub-schema
    return f"{g.json(rule, sub, lenient)} {g.mark('</arg_value>')}"


FORMAT = Glm45Format  # what the registry (formats/__init__.py) lists
