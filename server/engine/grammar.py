"""Grammar-constrained decoding (JSON, JSON Schema, tool-call markup) with llguidance.

llguidance compiles a grammar (Lark-like, context-free, with regex terminals; JSON schemas
compile into the same form) into an Earley parser over a lazily built lexer. Each step it walks
the token trie (every vocabulary entry as bytes, shared prefixes stored once) through the lexer
and parser, pruning a subtree as soon as its prefix cannot be lexed or parsed, and yields one
bit per token; the sampler turns the zero bits into -inf logits. The walk is native CPU code,
typically well under a millisecond per sequence and step, whatever the model.

`GrammarCompiler` builds llguidance's tokenizer once (``tokenizer.json`` and the EOS ids) and
compiles constraints, validating them by compiling them for real so that a bad schema is a
`GrammarError` (HTTP 400) before anything is queued; compiled grammars stay in an LRU as
prototypes that each sequence copies. It is safe from any thread. `Matcher` is one sequence's
parser state (engine thread only); ``grammar_mask.allowed_mask`` turns a batch's matchers
into one mask.

JSON is written compactly (``", "`` and ``": "`` separators, no other whitespace), so a small
model cannot wander off into endless whitespace. A complete grammar allows only EOS, and
`Matcher.is_done` says when nothing else can follow. Special tokens never occur inside JSON
text; tool-call markers that are special tokens (GLM-4.5's ``<tool_call>``) are matched as
those tokens, never spelled out.

The markup of tool calls belongs to each format class (``server/text/formats``): the compiler
hands it a `GrammarWriter` (``server/text/formats/grammar_writer.py``), whose helpers write
literals, markers, JSON-schema sub-rules and raw text, and compiles the Lark text the format
returns. It does not know any format's
syntax, parse output back into tool calls (the formats do), choose which request gets which
constraint (the API), fast-forward forced tokens, backtrack, or handle speculative drafts.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import llguidance

from moeserve.server.text.formats.grammar_writer import JSON_LAYOUT, GrammarWriter
from moeserve.server.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_MAX_MESSAGE = 600  # characters of an llguidance error kept in a user-facing message


class GrammarError(ValueError):
    """A constraint that cannot be compiled; the message names the problem (HTTP 400)."""


@dataclass(frozen=True)
class Constraint:
    """A compiled and validated grammar, as plain data that can cross the thread boundary."""

    grammar: str  # llguidance grammar text (its JSON form or Lark), as `LLMatcher` takes it
    kind: str  # "json_object" | "json_schema" | "tool_calls"


class ToolCallSyntax(Protocol):
    """What the compiler needs of a tool-call format (``server.text.formats.ToolFormat``)."""

    def grammar(
        self, g: GrammarWriter, functions: list[tuple[str, dict[str, Any]]], parallel: bool
    ) -> str:
        """The Lark grammar of a constrained answer calling some of ``functions``."""
        ...


def _short(message: str, first_line: bool = False) -> str:
    message = (message.strip().splitlines() or [""])[0] if first_line else message.strip()
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "..."


class GrammarCompiler:
    """Compiles constraints for one tokenizer and hands out per-sequence matchers.

    Args:
        tokenizer: The served model's tokenizer.
        cache_size: Compiled grammars kept (least recently used ones are dropped).
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Llguidance's view of the tokenizer: token bytes, special tokens, EOS (built once)."""
        with self._lock:
            if self._ll_tokenizer is None:
                # tokenizer.json as the Rust tokenizers library writes it; padding and
                # truncation are encoding settings that have no business in a token trie.
                spec = json.loads(self.tokenizer.backend.to_str())
                spec["padding"] = spec["truncation"] = None
                eos = sorted(self.tokenizer.eos_token_ids) or None
                self._ll_tokenizer = llguidance.LLTokenizer(json.dumps(spec), eos_token=eos)
            return self._ll_tokenizer

    def prebuild(self) -> threading.Thread:
        """Build ``ll_tokenizer`` on a background thread now, not in the first request.

        At a 151,936-token vocabulary (Qwen3's) the build takes ~3.6 s on a CPU: paid at
        startup, that is no one's time to first token. A failure here is only logged; the
        first constrained request then raises it as before.

        Returns:
            The (daemon) thread building it.
        """

        def build() -> None:
            try:
                self.ll_tokenizer  # noqa: B018 - the property builds and caches it
            except Exception:
                logger.warning("grammar: building the llguidance tokenizer failed", exc_info=True)

        thread = threading.Thread(target=build, name="moeserve-grammar-prebuild", daemon=True)
        thread.start()
        return thread

    def json_object(self) -> Constraint:
        """Any JSON object (``response_format: {"type": "json_object"}``).

        Returns:
            The constraint.
        """
        return Constraint(self.json_schema({"type": "object"}).grammar, "json_object")

    def json_schema(self, schema: dict[str, Any], strict: bool = True) -> Constraint:
        """A JSON value that validates against ``schema``.

        Args:
            schema: The JSON schema.
            strict: Refuse keywords llguidance does not implement; when False they are
                ignored (the output then may not honour them).

        Returns:
            The constraint.

        Raises:
            GrammarError: The schema is not an object or llguidance cannot compile it.
        """
        if not isinstance(schema, dict):
            raise GrammarError(f"the JSON schema must be an object, got {type(schema).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, overrides={**JSON_LAYOUT, "lenient": not strict}
            )
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {_short(str(e))}") from e
        self._prototype(grammar, "invalid JSON schema")
        return Constraint(grammar, "json_schema")

    def tool_calls(
        self, tools: list[dict[str, Any]], names: list[str], fmt: ToolCallSyntax, parallel: bool
    ) -> Constraint:
        """Tool-call markup in a format's syntax, then EOS.

        Args:
            tools: OpenAI tool definitions (``{"type": "function", "function": {...}}``; a bare
                function object is accepted too). Arguments follow each function's
                ``parameters`` schema, leniently unless the function says ``"strict": true``.
            names: Functions that may be called (all of them for ``tool_choice: "required"``,
                one for a named ``tool_choice``).
            fmt: The format class (``server.text.formats.tool_format(name)``).
            parallel: Several calls (as many as the format allows); else one.

        Returns:
            The constraint.

        Raises:
            GrammarError: No or unknown names, or a schema that cannot compile.
        """
        functions = _functions(tools)
        if not names:
            raise GrammarError("a tool-call constraint needs at least one function name")
        unknown = [n for n in names if n not in functions]
        if unknown:
            raise GrammarError(f"function {unknown[0]!r} is not among the request's tools")
        chosen = {name: functions[name] for name in names}
        self._check_functions(chosen)  # names the function whose schema fails
        lark = fmt.grammar(GrammarWriter(self.tokenizer), list(chosen.items()), parallel)
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        self._prototype(grammar, "")
        return Constraint(grammar, "tool_calls")

    def check_tools(self, tools: list[dict[str, Any]]) -> None:
        """Validate every tool's ``parameters`` schema, as OpenAI does whatever ``tool_choice``.

        Compiled schemas stay in the LRU, so an agent resending its tools each turn pays once.

        Args:
            tools: OpenAI tool definitions.

        Raises:
            GrammarError: A tool without a name, or a schema that cannot compile; the message
                names the function.
        """
        self._check_functions(_functions(tools))

    def _check_functions(self, functions: dict[str, dict[str, Any]]) -> None:
        for name, fn in functions.items():
            try:
                self.json_schema(fn["parameters"], strict=bool(fn.get("strict")))
            except GrammarError as e:
                raise GrammarError(f"function {name!r}: {e}") from None

    def matcher(self, constraint: Constraint) -> Matcher:
        """A fresh matcher for one sequence.

        Args:
            constraint: From one of this compiler's methods.

        Returns:
            A matcher at the start of the grammar.

        Raises:
            GrammarError: The grammar does not compile (it was not built by this compiler).
        """
        proto = self._prototype(constraint.grammar, "invalid constraint")
        return Matcher(proto.deep_copy(), constraint.kind, self.ll_tokenizer.vocab_size)

    def _prototype(self, grammar: str, what: str) -> llguidance.LLMatcher:
        """The compiled matcher for ``grammar``, from the LRU or compiled now (outside the lock)."""
        with self._lock:
            proto = self._cache.get(grammar)
            if proto is not None:
                self._cache.move_to_end(grammar)
                return proto
        proto = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if proto.is_error():
            raise GrammarError(f"{what}{': ' if what else ''}{_short(proto.get_error())}")
        _check_first_step(proto, what)
        with self._lock:
            self._cache[grammar] = proto
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return proto


def _check_first_step(proto: llguidance.LLMatcher, what: str) -> None:
    """Compute a copy's first mask, so a grammar that fails only once it runs fails here.

    llguidance builds its lexer lazily: a schema such as ``{"$ref": "#"}`` (a value that is
    itself, forever) compiles, and its error appears at the first mask. Finding it at
    compile time makes it a 400 before anything is queued, never an error mid-stream.
    """
    probe = proto.deep_copy()
    mask = probe.compute_bitmask()
    if probe.is_error():
        reason = _short(probe.get_error(), first_line=True)
        raise GrammarError(f"{what or 'constraint'}: the grammar cannot produce output ({reason})")
    if not any(mask):
        raise GrammarError(f"{what or 'constraint'}: the grammar allows no token at all")


class Matcher:
    """One sequence's position in its grammar; used on the engine thread only.

    Args:
        inner: llguidance's matcher, at the start of the grammar.
        kind: The constraint's kind (for messages).
        vocab_size: Tokens llguidance knows; larger ids of a padded model are never allowed.
    """

    def __init__(self, inner: llguidance.LLMatcher, kind: str, vocab_size: int) -> None:
        self.inner = inner
        self.kind = kind
        self.vocab_size = vocab_size
        self.error: str | None = None  # set once the matcher failed; it never recovers

    @property
    def is_done(self) -> bool:
        """Whether the grammar is complete and nothing but EOS may follow."""
        return self.error is None and self.inner.is_stopped() and not self.inner.is_error()

    @property
    def mask_bytes(self) -> int:
        """Bytes of one bitmask row: whole little-endian 32-bit words, one bit per token."""
        return 4 * ((self.vocab_size + 31) // 32)

    def consume(self, token_id: int) -> bool:
        """Advance past a sampled token.

        Args:
            token_id: The token the sampler chose.

        Returns:
            False if the grammar rejects it (``error`` then says why).
        """
        if self.error is None and not self.inner.consume_token(token_id):
            self.fail(self.inner.get_error() or f"token {token_id} is not allowed")
        return self.error is None

    def fail(self, reason: str) -> None:
        """Mark the matcher failed for good (the engine then fails its request).

        Args:
            reason: What went wrong; its first line goes into ``error``.
        """
        self.error = f"{self.kind} constraint failed: {_short(reason, first_line=True)}"


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Name -> function object (with ``parameters`` defaulted as OpenAI does)."""
    functions = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GrammarError("every tool needs a function with a string name")
        params = fn.get("parameters")
        if params is None:  # OpenAI: no parameters means an empty parameter list
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, dict):
            raise GrammarError(f"function {fn['name']!r}: parameters must be a JSON schema object")
        functions[fn["name"]] = {**fn, "parameters": params}
    return functions
