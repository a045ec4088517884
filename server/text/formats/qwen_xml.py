r"""The "qwen_xml" tool-call format of Qwen3-Coder and Qwen3.5: function and parameter tags.

One call is ``<tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n...</function>\n
</tool_call>``. The templates write a string value as it is and any other value as its text
(Qwen3.5: JSON for objects and arrays, Python's ``str`` for the rest, so ``True`` and ``None``
occur), which is why the parser needs the tool's parameter types to rebuild the arguments.

This module knows the markup, the conversion of values by schema type and the constraint
grammar. It does not know tokens or HTTP, does not validate arguments against the schema
beyond picking a value's type, and does not accept a parameter whose ``</parameter>`` is
missing (vLLM's parser guesses the end from the next tag; here such a call is content).
"""

from __future__ import annotations

import ast
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

_FUNCTION = "<function="
_FUNCTION_END = "</function>"
_PARAMETER = "<parameter="
_PARAMETER_END = "</parameter>"
# A function or parameter name: no whitespace, no tag characters.
_NAME = re.compile(r"[^\s<>]*")
# Python spellings a template's `| string` writes for booleans and null.
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


class QwenXmlFormat(ToolFormat):
    """The "qwen_xml" format: `<tool_call><function=NAME><parameter=P>V</parameter></function>`.

    Detected from a template that writes `<function=` and `<parameter=`. The parser streams the
    arguments object one parameter at a time (`{"P": V` when the first `</parameter>` arrives,
    `, "P2": V2` for each further one, `}` at `</function>`). One newline after
    `<parameter=P>` and one before `</parameter>` are markup (the templates write them); the
    rest is the value. Value types follow the request's tool schema: a parameter typed
    "string" stays the text as written; one typed integer, number, boolean, object, array or
    null takes the value's JSON (or Python's spelling of it: `True`, `None`, `{'a': 1}`) when
    it parses to that type, and stays a string otherwise; a parameter the schema does not
    declare, or any parameter without tools, stays a string. At the end of the stream a call
    whose `</function>` came but whose `</tool_call>` did not is still a call.

    Args:
        tools: The request's OpenAI tool definitions, for the parameter types.
    """

    name = "qwen_xml"

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """A template that writes `<function=` and `<parameter=` tags."""
        return _FUNCTION in template and _PARAMETER in template

    @classmethod
    def call_grammar(cls, g: GrammarWriter, i: int, name: str, fn: dict[str, Any]) -> str:
        """``<tool_call>`` NL ``<function=NAME>`` NL, parameters, ``</function>`` NL, end tag.

        Declared properties come in schema order, required ones mandatory; a string value is
        raw text (enums as their literals), any other its compact JSON. Without declared
        properties: any parameter names, raw values.
        """
        params, lenient = fn["parameters"], not fn.get("strict", False)
        props = params.get("properties")
        if isinstance(props, dict) and (props or params.get("additionalProperties") is False):
            required = params.get("required", ())
            parts = [
                f"({g.literal(f'{_PARAMETER}{key}>' + chr(10))} "
                f"{_value(g, f'v_{i}_{k}', schema, params, lenient)})"
                + ("" if key in required else "?")
                for k, (key, schema) in enumerate(props.items())
            ]
        else:
            key = g.raw_until(f"k_{i}", ">\n")
            value = g.raw_until(f"v_{i}", "\n" + _PARAMETER_END)
            parts = [f'({g.literal(_PARAMETER)} {key} {value} "\\n")*']
        head = g.literal(f"\n{_FUNCTION}{name}>\n")
        body = " ".join([head, *parts, g.literal(_FUNCTION_END + "\n")])
        return g.rule(f"call_{i}", f"{g.mark(cls.START)} {body} {g.mark(cls.END)}")

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._schemas = _parameter_schemas(tools or [])

    def _reset_call(self) -> None:
        self._state = "function"
        self._param = ""
        self._seen: set[str] = set()

    def _scan(self, eof: bool) -> bool:
        while True:
            if self._state == "value":
                end = self._buf.find(_PARAMETER_END, self._pos)
                if end < 0:
                    return False
                self._add_parameter(self._buf[self._pos : end])
                self._pos, self._state = end + len(_PARAMETER_END), "between"
                continue
            pos = skip_ws(self._buf, self._pos)
            rest = self._buf[pos:]
            if self._state == "after":
                if rest.startswith(self.END):
                    self._pos = pos + len(self.END)
                    return True
                if self.END.startswith(rest):
                    if eof:  # the stream cut the end tag off a finished function
                        self._pos = len(self._buf)
                        return True
                    return False
                raise MalformedCallError("text between </function> and </tool_call>")
            tags = [_FUNCTION] if self._state == "function" else [_PARAMETER, _FUNCTION_END]
            tag = next((t for t in tags if rest.startswith(t)), None)
            if tag is None:
                if any(t.startswith(rest) for t in tags):
                    return False  # empty, or part of a tag
                raise MalformedCallError(f"expected one of {tags} ({self._state})")
            if tag == _FUNCTION_END:
                self._args("}" if self._seen else "{}")
                self._pos, self._state = pos + len(tag), "after"
                continue
            name = self._read_name(pos + len(tag))
            if name is None:
                return False
            if tag == _FUNCTION:
                self._start(name)
                self._state = "between"
            else:
                if name in self._seen:
                    raise MalformedCallError(f"parameter {name!r} given twice")
                self._param, self._state = name, "value"

    def _read_name(self, start: int) -> str | None:
        """The name in `<function=NAME>` / `<parameter=NAME>` from `start`; None: not all here."""
        match = _NAME.match(self._buf, start)
        assert match is not None  # the pattern matches the empty string
        if match.end() == len(self._buf):
            return None
        if self._buf[match.end()] != ">" or not match.group():
            raise MalformedCallError("a tag's name is empty or not closed by '>'")
        self._pos = match.end() + 1
        return match.group()

    def _add_parameter(self, raw: str) -> None:
        if "\n" + _PARAMETER in raw:  # a new parameter's tag: this one was never closed
            raise MalformedCallError(f"parameter {self._param!r} has no </parameter>")
        raw = raw.removeprefix("\n").removesuffix("\n")
        schema = self._schemas.get(self._call_name, {}).get(self._param)
        value = json.dumps(_convert(raw, schema), ensure_ascii=False)
        key = json.dumps(self._param, ensure_ascii=False)
        self._args(f"{', ' if self._seen else '{'}{key}: {value}")
        self._seen.add(self._param)


def _types(schema: Any) -> set[str]:
    """The JSON types a parameter schema names (``type`` string or list; ``anyOf`` options)."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind} if isinstance(kind, str) else set()
    for option in schema.get("anyOf") or schema.get("oneOf") or ():
        kinds |= _types(option)
    return kinds


def _convert(raw: str, schema: Any) -> Any:
    """A parameter's value: the text itself or, where the schema types it so, its JSON."""
    kinds = _types(schema)
    if not kinds - {"string"}:  # undeclared, untyped or a plain string: the text as written
        return raw
    text = raw.strip()
    try:
        value = strict_json(text)
    except ValueError:
        value = _python_value(text, kinds)
        if value is _NOT_A_VALUE:
            return raw
    if value is None:
        return None if "null" in kinds else raw
    for kind in kinds:
        types = _JSON_TYPES.get(kind, ())
        if isinstance(value, types) and not (kind != "boolean" and isinstance(value, bool)):
            return value
    return raw


_NOT_A_VALUE = object()


def _python_value(text: str, kinds: set[str]) -> Any:
    """A value as Python's ``str`` writes it (Qwen3-Coder's template renders non-strings so).

    ``True``/``False``/``None``, and for object and array parameters a Python literal such as
    ``{'a': True}``, read with `ast.literal_eval` (which evaluates no code) and kept only when
    it is JSON data; anything else is `_NOT_A_VALUE`.
    """
    if text in _PYTHON_LITERALS:
        return _PYTHON_LITERALS[text]
    if not kinds & {"object", "array"}:
        return _NOT_A_VALUE
    try:
        value = ast.literal_eval(text)
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_A_VALUE
    return value if isinstance(value, (dict, list)) else _NOT_A_VALUE


def _parameter_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Function name -> parameter name -> the parameter's schema (one local ``$ref`` followed)."""
    found: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        props = parameters.get("properties") if isinstance(parameters, dict) else None
        if isinstance(props, dict):
            found[function["name"]] = {k: resolve_ref(v, parameters) for k, v in props.items()}
    return found


def _value(g: GrammarWriter, rule: str, schema: Any, root: dict[str, Any], lenient: bool) -> str:
    """One parameter's value, then NL ``</parameter>`` NL."""
    target = resolve_ref(schema, root)
    close = "\n" + _PARAMETER_END
    if isinstance(target, dict) and _types(target) == {"string"} and "anyOf" not in target:
        choices = target.get("enum") or ([target["const"]] if "const" in target else None)
        if not choices or not all(isinstance(c, str) for c in choices):
            return f'{g.raw_until(rule, close, target)} "\\n"'
        literals = " | ".join(g.literal(c) for c in choices)
        return f"({literals}) {g.literal(close + chr(10))}"
    sub = with_defs(schema, root)  # keep local $refs resolvable in the sub-schema
    return f"{g.json(rule, sub, lenient)} {g.literal(close + chr(10))}"


FORMAT = QwenXmlFormat  # what the registry (formats/__init__.py) lists
