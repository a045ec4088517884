"""The helpers a tool-call format writes its constraint grammar with (``GrammarWriter``).

A format class (``server/text/formats``) describes its markup as a Lark grammar for
llguidance; ``server.engine.grammar.GrammarCompiler`` hands it a ``GrammarWriter`` and
compiles what it returns. The writer knows Lark's and llguidance's spelling of literals,
special tokens, inline JSON schemas and lazy regexes, and the compact JSON layout every
constraint uses (``JSON_LAYOUT``). It knows no format's syntax and compiles nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeserve.server.text.tokenizer import Tokenizer

# JSON layout options for llguidance's schema compiler: compact (", " and ": " separators,
# no other whitespace), so a small model cannot wander off into endless whitespace.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lit(text: str) -> str:
    """A Lark string literal (llguidance reads JSON string escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _regex_text(text: str) -> str:
    """``text`` matched literally inside a Lark ``/.../`` regex."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$/" else c for c in text)


class GrammarWriter:
    """The helpers a tool-call format writes its Lark grammar with; collects the rules.

    A markup string that is a special token of the tokenizer is written as that token
    (``<[id]>``), else as text. JSON parts are inline ``%json`` schemas with this module's
    layout, lenient unless asked to be strict.

    Args:
        tokenizer: The served model's tokenizer (for ``mark``).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.rules: list[str] = []

    def lark(self, head: list[str]) -> str:
        """The whole grammar: ``head`` (the start rule first), then the collected rules.

        Args:
            head: Rule lines that come first, ``start: ...`` among them.

        Returns:
            The grammar text.
        """
        return "\n".join(["%llguidance {}", *head, *self.rules]) + "\n"

    def rule(self, name: str, body: str) -> str:
        """Add the rule ``name: body`` and return ``name``, to use in other rules."""
        self.rules.append(f"{name}: {body}")
        return name

    @staticmethod
    def literal(text: str) -> str:
        """A Lark string literal matching ``text`` (llguidance reads JSON string escapes)."""
        return _lit(text)

    def mark(self, text: str) -> str:
        """A marker (``<tool_call>``): its special token if the tokenizer has one, else text."""
        token_id = self.tokenizer.backend.token_to_id(text)
        if token_id is not None and token_id in self.tokenizer.special_token_ids:
            return f"<[{token_id}]>"
        return _lit(text)

    def json(self, rule: str, schema: dict[str, Any], lenient: bool) -> str:
        """A JSON value that follows ``schema``, written in this module's compact layout.

        Args:
            rule: A rule name, unique in the grammar.
            schema: The JSON schema.
            lenient: Ignore keywords llguidance does not implement instead of refusing them.

        Returns:
            The rule name.
        """
        options = {**schema.get("x-guidance", {}), **JSON_LAYOUT, "lenient": lenient}
        return self.rule(rule, f"%json {json.dumps({**schema, 'x-guidance': options})}")

    def raw_until(self, rule: str, close: str, schema: dict[str, Any] | None = None) -> str:
        """Raw text, then the ``close`` marker (the first one ends the text).

        Args:
            rule: A rule name, unique in the grammar (unused when ``close`` is a special
                token, which can never occur inside text).
            close: The marker that ends the text.
            schema: A string schema whose ``minLength``/``maxLength`` bound the text; other
                keywords are not enforced on raw text.

        Returns:
            A Lark term for the text and its marker.
        """
        schema = schema or {}
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        text = f"(?s:.{{{low},{'' if high is None else int(high)}}})"
        closing = self.mark(close)
        if closing.startswith("<["):  # a special token can never occur inside text
            return f"/{text}/ {closing}"
        self.rules.append(f"{rule}[lazy]: /{text}{_regex_text(close)}/")
        return rule


def resolve_ref(schema: Any, root: dict[str, Any]) -> Any:
    """Follow one local ``$ref`` (``#/$defs/X``) of a parameter schema.

    Args:
        schema: A parameter's schema (maybe a ``$ref``).
        root: The function's whole parameters schema, which holds the definitions.

    Returns:
        The referenced schema; anything else as given.
    """
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    node: Any = root
    for part in ref[2:].split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else schema


def with_defs(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema carrying the root's definitions, so its local ``$ref``s resolve.

    Args:
        schema: A parameter's schema.
        root: The function's whole parameters schema.

    Returns:
        A copy of ``schema`` with ``$defs`` / ``definitions`` added where the root has them.
    """
    sub = dict(schema) if isinstance(schema, dict) else {}
    for defs in ("$defs", "definitions"):
        if defs in root:
            sub.setdefault(defs, root[defs])
    return sub
