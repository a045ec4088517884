r"""The "minimax_m2" tool-call format of MiniMax-M2: ``<invoke>`` XML in a tool-call block.

MiniMax-M2's template writes an assistant's calls as one block after its content::

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    <parameter name="days">3</parameter>
    </invoke>
    </minimax:tool_call>

one ``<invoke>`` per call, a string value as it is and any other value as its JSON
(``tojson``), so the parser needs the tool's parameter types to tell ``"3"`` from ``3``. Its
reasoning (``<think>`` ... ``</think>``, opened by the generation prompt) is the "think"
format's and is removed before this parser sees the text. The template renders an earlier
turn's reasoning (``reasoning_content``, or a ``<think>`` block left in the content) only for
assistant turns after the last user message: the tool-calling steps of the current turn.

Each ``<invoke>`` is one call (``START`` ... ``END``); the block's opening tag before the first
is markup (``SECTION``), and the scanner itself consumes the closing tag after a call (so an
``<invoke>`` is a call only inside an open block). An ``<invoke>`` outside a block, a block left
open before other text, a parameter given twice or one without ``</parameter>`` make the call
content again; the ``<invoke>`` elements after a malformed one in the same block are content too
(vLLM's parser reads each one on its own; here the block is no longer trusted). At the end of
the stream a finished ``</invoke>`` whose block never closed is still a call.

It does not validate arguments against the schema beyond picking a value's type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from typing import Any

from moeserve.server.text.formats.grammar_writer import GrammarWriter, resolve_ref, with_defs
from moeserve.server.text.formats.tool_base import (
    MAX_PARALLEL_CALLS,
    MalformedCallError,
    ToolFormat,
    skip_ws,
    strict_json,
)

_OPEN = "<minimax:tool_call>"
_CLOSE = "</minimax:tool_call>"
_PARAMETER = "<parameter name="
_PARAMETER_END = "</parameter>"
# A tag's name: in double or single quotes (the template writes double), or bare.
_NAME = re.compile(r"\"([^\"<>\n]*)\">|'([^'<>\n]*)'>|([^\s\"'<>]*)>")
_NAME_MAX = 512  # more text without the tag's closing '>' is not a name


class MinimaxM2Format(ToolFormat):
    """``<invoke name="NAME"><parameter name="P">V</parameter>...</invoke>`` in a block.

    Detected from a template that writes ``<minimax:tool_call>``. The parser streams the
    arguments object one parameter at a time (``{"P": V`` when the first ``</parameter>``
    arrives, ``, "P2": V2`` for each further one, ``}`` at ``</invoke>``). A value is the text
    between the tags exactly as written, and stays that text unless it is JSON other than a
    string that the parameter may take: a parameter whose schema in `tools` names types
    ("integer", "null", ...; ``anyOf`` and a local ``$ref`` read) takes such JSON only when
    it is of one of them (so a "string" parameter always stays text, and ``null`` becomes
    None for a "string"/"null" one); a parameter without a declared type, or any parameter
    without tools, takes any non-string JSON, as the template writes non-string values.

    Args:
        tools: The request's OpenAI tool definitions, for the parameter types.
    """

    name = "minimax_m2"
    START = "<invoke name="
    END = "</invoke>"
    # The close is consumed by the call scanner (see the module docstring), not by the base.
    SECTION = (_OPEN, "")
    MARKERS = (_OPEN, _CLOSE, START, END)

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """A template that writes ``<minimax:tool_call>``."""
        return _OPEN in template

    @classmethod
    def call_grammar(cls, g: GrammarWriter, i: int, name: str, fn: dict[str, Any]) -> str:
        """``<invoke name="NAME">`` NL, ``<parameter name="P">V</parameter>`` NL each, end tag.

        Declared properties come in schema order, required ones mandatory; a string value is
        raw text (enums as their literals), any other its compact JSON. Without declared
        properties: any parameter names, raw values.
        """
        params, lenient = fn["parameters"], not fn.get("strict", False)
        props = params.get("properties")
        if isinstance(props, dict) and (props or params.get("additionalProperties") is False):
            required = params.get("required", ())
            parts = [
                f"({_tag(g, _PARAMETER, key)} {_value(g, f'v_{i}_{k}', schema, params, lenient)}"
                + (' "\\n")' if key in required else ' "\\n")?')
                for k, (key, schema) in enumerate(props.items())
            ]
        else:
            key = g.raw_until(f"k_{i}", '">')
            value = g.raw_until(f"v_{i}", _PARAMETER_END)
            parts = [f'({g.literal(_PARAMETER + chr(34))} {key} {value} "\\n")*']
        head = f'{_tag(g, cls.START, name)} "\\n"'
        return g.rule(f"call_{i}", " ".join([head, *parts, g.literal(cls.END)]))

    @classmethod
    def grammar(
        cls, g: GrammarWriter, functions: list[tuple[str, dict[str, Any]]], parallel: bool
    ) -> str:
        """One block of one call (up to `MAX_PARALLEL_CALLS` when parallel), then EOS."""
        alternatives = [cls.call_grammar(g, i, name, fn) for i, (name, fn) in enumerate(functions)]
        repeat = f"{{1,{MAX_PARALLEL_CALLS}}}" if parallel else ""
        head = f'start: {g.mark(_OPEN)} "\\n" (call "\\n"){repeat} {g.mark(_CLOSE)}'
        return g.lark([head, "call: " + " | ".join(alternatives)])

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._param_types = _param_types(tools or [])
        self._block_open = False  # the last call ended with another <invoke> following it

    def _reset_call(self) -> None:
        # A call belongs to a block its own opening tag started, or to the previous call's.
        in_block = _OPEN in self._lead_ws or (self._block_open and self._after_call)
        self._block_open = False
        self._state = "name" if in_block else "outside"
        self._param = ""
        self._seen: set[str] = set()

    def _scan(self, eof: bool) -> bool:
        if self._state == "outside":
            raise MalformedCallError("an <invoke> outside a <minimax:tool_call> block")
        while True:
            if self._state == "value":
                end = self._buf.find(_PARAMETER_END, self._pos)
                if end < 0:
                    return False
                self._add_parameter(self._buf[self._pos : end])
                self._pos, self._state = end + len(_PARAMETER_END), "between"
                continue
            if self._state == "name":
                name = self._read_name(self._pos)
                if name is None:
                    return False
                self._start(name)
                self._state = "between"
                continue
            pos = skip_ws(self._buf, self._pos)
            rest = self._buf[pos:]
            if self._state == "after":
                return self._after_invoke(pos, rest, eof)
            tag = next((t for t in (_PARAMETER, self.END) if rest.startswith(t)), None)
            if tag is None:
                if _PARAMETER.startswith(rest) or self.END.startswith(rest):
                    return False  # empty, or part of a tag
                raise MalformedCallError("expected <parameter name=...> or </invoke>")
            if tag == self.END:
                self._args("}" if self._seen else "{}")
                self._pos, self._state = pos + len(tag), "after"
                continue
            name = self._read_name(pos + len(tag))
            if name is None:
                return False
            if name in self._seen:
                raise MalformedCallError(f"parameter {name!r} given twice")
            self._param, self._state = name, "value"

    def _after_invoke(self, pos: int, rest: str, eof: bool) -> bool:
        """After ``</invoke>``: the block's close (consumed) or the next ``<invoke>`` (left)."""
        if rest.startswith(_CLOSE):
            self._pos = pos + len(_CLOSE)
            return True
        if rest.startswith(self.START):
            self._block_open = True  # the next call continues this block
            return True
        if _CLOSE.startswith(rest) or self.START.startswith(rest):
            if not eof:
                return False  # empty, or part of a tag: undecided
            self._pos = len(self._buf)  # the stream ended inside an unclosed block
            return True
        raise MalformedCallError("text after </invoke> inside the block")

    def _read_name(self, start: int) -> str | None:
        """The name of a tag at `start` (``"NAME">``), `_pos` past it; None while incomplete."""
        match = _NAME.match(self._buf, start)
        if match is None:
            head = self._buf[start : start + _NAME_MAX]
            if ">" in head or "\n" in head or len(head) >= _NAME_MAX:
                raise MalformedCallError("a tag's name is not followed by '>'")
            return None
        name = next(group for group in match.groups() if group is not None)
        if not name.strip():
            raise MalformedCallError("a tag's name is empty")
        self._pos = match.end()
        return name.strip()

    def _add_parameter(self, raw: str) -> None:
        if _PARAMETER in raw or self.END in raw:  # a new tag: this parameter was never closed
            raise MalformedCallError(f"parameter {self._param!r} has no </parameter>")
        kinds = self._param_types.get(self._call_name, {}).get(self._param, set())
        value = json.dumps(raw, ensure_ascii=False)
        if kinds != {"string"}:
            try:
                parsed = strict_json(raw)
            except ValueError:
                parsed = raw
            if not isinstance(parsed, str) and (not kinds or _json_type(parsed) & kinds):
                value = raw.strip()  # the JSON exactly as the model wrote it
        key = json.dumps(self._param, ensure_ascii=False)
        self._args(f"{', ' if self._seen else '{'}{key}: {value}")
        self._seen.add(self._param)


def _tag(g: GrammarWriter, opening: str, name: str) -> str:
    """``<invoke name="NAME">`` or ``<parameter name="NAME">``, the name unescaped as written."""
    return g.literal(f'{opening}"{name}">')


def _types(schema: Any, root: dict[str, Any]) -> set[str]:
    """The JSON types a parameter schema names (``type``, ``anyOf``/``oneOf``, a local $ref)."""
    schema = resolve_ref(schema, root)
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind} if isinstance(kind, str) else set()
    for option in schema.get("anyOf") or schema.get("oneOf") or ():
        kinds |= _types(option, root)
    return kinds


def _json_type(value: Any) -> set[str]:
    """The schema types a parsed JSON value satisfies."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    return {"object"} if isinstance(value, dict) else {"array"}


def _param_types(tools: list[dict[str, Any]]) -> dict[str, dict[str, set[str]]]:
    """Function name -> parameter name -> the JSON types its schema names (empty: untyped)."""
    found: dict[str, dict[str, set[str]]] = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        props = parameters.get("properties") if isinstance(parameters, dict) else None
        found[function["name"]] = {k: _types(v, parameters) for k, v in (props or {}).items()}
    return found


def _value(g: GrammarWriter, rule: str, schema: Any, root: dict[str, Any], lenient: bool) -> str:
    """One parameter's value and its ``</parameter>``."""
    target = resolve_ref(schema, root)
    if isinstance(target, dict) and _types(target, root) == {"string"} and "anyOf" not in target:
        choices = target.get("enum") or ([target["const"]] if "const" in target else None)
        if not choices or not all(isinstance(c, str) for c in choices):
            return g.raw_until(rule, _PARAMETER_END, target)
        return f"({' | '.join(g.literal(c) for c in choices)}) {g.literal(_PARAMETER_END)}"
    sub = with_defs(schema, root)  # keep local $refs resolvable in the sub-schema
    return f"{g.json(rule, sub, lenient)} {g.literal(_PARAMETER_END)}"


FORMAT = MinimaxM2Format  # what the registry (formats/__init__.py) lists
