"""The tool-call format base: what a format class declares, the events its parser emits.

A format is one class (see the package docstring for the registry). At class level it
declares its name, its markers, how to recognise it in a chat template (`detect`) and the
grammar of its markup for constrained decoding (`grammar`, built with the helpers of
`GrammarWriter` in `grammar_writer.py`). An instance is the streaming parser for one response:
text in, `ContentDelta` / `ToolCallStart` / `ToolCallArgs` events out. This module holds the
machinery every format shares: holding back text that might still become markup, numbering
calls, turning a malformed call back into content. A subclass writes only its call body
(`_reset_call`, `_scan`), its detection rule and the grammar of one call (`call_grammar`).

Three optional class settings serve formats whose markup is more than calls. ``SECTION``
names markers that wrap a run of calls (DeepSeek's ``<｜tool▁calls▁begin｜>`` and
``<｜tool▁calls▁end｜>``): like the whitespace between calls they are markup, not content. A
format whose markup also separates reasoning from the answer (harmony's channels) sets
``SPLITS_REASONING``: its parser then emits `ReasoningDelta` events too, runs on every response
of the model (tools or not) and no separate reasoning format runs. ``TURN_END`` names markers
after which the model's turn is over; the server stops generating on them even where a
generation config omits them.

It does not know tokens, sampling, reasoning blocks (a reasoning format removes them before this
sees the text, unless the format splits reasoning itself) or the HTTP wire format, and it does not
check arguments against the function's parameter schema.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Container
from dataclasses import dataclass
from typing import Any, ClassVar

from moeserve.server.text.formats.grammar_writer import GrammarWriter

logger = logging.getLogger(__name__)

MAX_PARALLEL_CALLS = 4  # tool calls in one constrained answer when parallel calls are allowed


@dataclass
class ContentDelta:
    """A piece of plain assistant text (never markup of a well-formed call)."""

    text: str


@dataclass
class ToolCallStart:
    """A tool call begins: its stream index, id (`call_<24 hex>`) and function name."""

    index: int
    id: str
    name: str


@dataclass
class ToolCallArgs:
    """The next piece of call `index`'s arguments, a JSON object's text, as it is generated."""

    index: int
    text: str


@dataclass
class ReasoningDelta:
    """A piece of reasoning, from a format that splits reasoning itself (``SPLITS_REASONING``)."""

    text: str


Event = ContentDelta | ToolCallStart | ToolCallArgs | ReasoningDelta


@dataclass
class ToolCall:
    """A finished, well-formed tool call; `arguments` is a JSON object's text."""

    id: str
    name: str
    arguments: str


class MalformedCallError(Exception):
    """The open call does not follow the format; its text goes back to being content."""


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`.

    Args:
        text: Text seen so far.
        marker: A markup string that may be split across chunks.

    Returns:
        How many trailing characters of `text` must be held back (0 when none).
    """
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def strict_json(text: str) -> Any:
    """Parse JSON, refusing NaN and Infinity (Python accepts them; a client's parser would not)."""

    def reject(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=reject)


def skip_ws(text: str, pos: int) -> int:
    """The first position at or after `pos` that is not JSON whitespace."""
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def decode(text: str) -> Any:
    """`strict_json` for a call's parts: invalid JSON makes the call malformed."""
    try:
        return strict_json(text)
    except ValueError as exc:
        raise MalformedCallError(f"invalid JSON {text[:40]!r}: {exc}") from exc


class ToolFormat:
    """One tool-call format: its detection, markers and grammar; an instance parses one response.

    Call `feed` with each new piece of text and `finish` once at the end; both return the
    events the text decided. Text before, between and after calls is content, except
    whitespace that only separates content from a call or calls from each other (part of the
    markup). A call that turns out unfinished or malformed comes back as content, with all
    of its text; if its `ToolCallStart` was already streamed it is missing from `calls`, and
    later calls still get new indices. The exception is a generation cut short
    (``finish(truncated=True)``): a call it left unfinished is dropped, not made content.

    Args:
        tools: The request's OpenAI tool definitions (optional; a format may read parameter
            types from them, as glm45 does).
    """

    name: ClassVar[str] = ""  # the `tool_parser` setting's value for this format
    START: ClassVar[str] = "<tool_call>"
    END: ClassVar[str] = "</tool_call>"
    # Markup the parser must see even where a tokenizer declares it a special token (special
    # tokens are otherwise dropped from the text).
    MARKERS: ClassVar[tuple[str, ...]] = ("<tool_call>", "</tool_call>")
    CALL_SEPARATOR: ClassVar[str] = "\n"  # between parallel calls in constrained output
    # (open, close) around a run of calls, both markup; ("", "") when the format has none.
    SECTION: ClassVar[tuple[str, str]] = ("", "")
    # The parser also emits ReasoningDelta events; no reasoning format runs beside it.
    SPLITS_REASONING: ClassVar[bool] = False
    # Markers after which the model's turn is over (generation stops on them).
    TURN_END: ClassVar[tuple[str, ...]] = ()

    # --- what the registry and the grammar compiler ask of a format ----------------------------

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """Whether a chat template writes tool calls in this format.

        Args:
            template: The model's chat template text (all of its named templates joined).
            vocabulary: Token texts of the model's tokenizer.

        Returns:
            True when this format is the one the template writes.
        """
        raise NotImplementedError

    @classmethod
    def call_grammar(cls, g: GrammarWriter, i: int, name: str, fn: dict[str, Any]) -> str:
        """Write the Lark rules of one call to function `name` and return the call's rule name.

        Args:
            g: Collects rules; its helpers write literals, markers, JSON and raw text.
            i: The function's position among the allowed ones (for unique rule names).
            name: The function name.
            fn: The function object, `parameters` defaulted; `strict` asks for strict JSON.

        Returns:
            The rule (``call_{i}``) that matches one complete call.
        """
        raise NotImplementedError

    @classmethod
    def grammar(
        cls, g: GrammarWriter, functions: list[tuple[str, dict[str, Any]]], parallel: bool
    ) -> str:
        """The Lark grammar of a constrained answer: one call (or up to four), then EOS.

        Args:
            g: A fresh writer for the served tokenizer.
            functions: (name, function object) of each function that may be called.
            parallel: One to `MAX_PARALLEL_CALLS` calls, `CALL_SEPARATOR` between them.

        Returns:
            The grammar text, as ``llguidance.LLMatcher.grammar_from_lark`` takes it.
        """
        alternatives = [cls.call_grammar(g, i, name, fn) for i, (name, fn) in enumerate(functions)]
        separator = g.literal(cls.CALL_SEPARATOR)
        repeat = f" ({separator} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else ""
        return g.lark([f"start: call{repeat}", "call: " + " | ".join(alternatives)])

    # --- the streaming parser -------------------------------------------------------------------

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self._calls: list[ToolCall] = []
        self._events: list[Event] = []
        self._buf = ""  # text not yet turned into events; in a call, starts after START
        self._pos = 0  # in a call: how much of _buf the format scanner has consumed
        self._in_call = False
        self._lead_ws = ""  # whitespace before the open call's START, restored if it fails
        self._after_call = False  # nothing but whitespace since the last well-formed call
        self._next_index = 0
        self._finished = False
        self._cut = False  # finish(truncated=True): a call left open at the end is dropped
        self._call_index: int | None = None
        self._call_id = ""
        self._call_name = ""
        self._call_args = ""

    @property
    def calls(self) -> list[ToolCall]:
        """The well-formed tool calls completed so far, in order."""
        return list(self._calls)

    def feed(self, text: str) -> list[Event]:
        """Add newly generated text.

        Args:
            text: The next chunk, split anywhere (even inside markup).

        Returns:
            The events this text decided, in stream order.

        Raises:
            RuntimeError: `finish` was already called.
        """
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        self._run(eof=False)
        return self._take_events()

    @property
    def in_reasoning(self) -> bool:
        """Whether the text so far ends inside reasoning (only a ``SPLITS_REASONING`` format)."""
        return False

    def finish(self, truncated: bool = False) -> list[Event]:
        """End the stream: held-back text and any unfinished call become content.

        Args:
            truncated: The generation was cut (``max_tokens``), not ended by the model. Then a
                call the end of the text leaves unfinished is not malformed but unwritten: its
                text is dropped, neither a call nor content, and so is a held-back tail that
                may be the start of markup (with the whitespace before it).

        Returns:
            The remaining events.
        """
        if not self._finished:
            self._finished = True
            if truncated:
                self._run(eof=False)  # everything the text already decides, as usual
                self._cut = True
                self._drop_unfinished()
            self._run(eof=True)
        return self._take_events()

    def _drop_unfinished(self) -> None:
        """Forget the start of markup a cut generation left in the held-back tail.

        An open call is left to `_step_call`: the end of the text may still complete it (a
        format whose end marker is optional at EOF), and if not, the cut drops it there.
        """
        close = self.SECTION[1]
        if self._in_call:
            return
        if close and self._after_call and close.startswith(self._buf.lstrip()):
            self._buf = ""  # the section's close, cut short
        elif keep := self._undecided_tail(self._buf):
            self._buf = self._buf[: len(self._buf) - keep].rstrip()

    def _run(self, eof: bool) -> None:
        # Each step either switches between content and a call (go on) or needs more text.
        progressed = True
        while progressed:
            progressed = self._step_call(eof) if self._in_call else self._step_content(eof)

    def _step_content(self, eof: bool) -> bool:
        buf = self._buf
        close = self.SECTION[1]
        if close and self._after_call:  # a section's close right after a call is markup
            rest = buf.lstrip()
            if rest.startswith(close):
                self._buf = rest[len(close) :]
                return True
            if rest and close.startswith(rest) and not eof:
                return False  # perhaps the start of the close: undecided
        start = buf.find(self.START)
        if start < 0:
            keep = 0 if eof else self._undecided_tail(buf)
            body = buf[: len(buf) - keep]
            # Whitespace may still turn out to precede a call; hold it until that is decided.
            cut = len(body) if eof else len(body.rstrip())
            if not (eof and self._after_call and not body.strip()):
                self._content(body[:cut])
            self._buf = buf[cut:] if not eof else ""
            return False
        before = buf[:start]
        text = before.rstrip()
        if self.SECTION[0] and text.endswith(self.SECTION[0]):  # the section's open is markup
            text = text[: -len(self.SECTION[0])].rstrip()
        self._content(text)
        self._lead_ws = before[len(text) :]
        self._buf = buf[start + len(self.START) :]
        self._pos = 0
        self._in_call = True
        self._call_index, self._call_name, self._call_args = None, "", ""
        self._reset_call()
        return True

    def _undecided_tail(self, buf: str) -> int:
        """How many trailing characters may still become markup.

        That is part of START, or the section's open (whitespace and part of START may follow).
        """
        keep = partial_marker_len(buf, self.START)
        opening = self.SECTION[0]
        if opening:
            rest = buf[: len(buf) - keep].rstrip()
            if rest.endswith(opening):
                return len(buf) - len(rest) + len(opening)
            keep = max(keep, partial_marker_len(buf, opening))
        return keep

    def _step_call(self, eof: bool) -> bool:
        try:
            if not self._scan(eof):
                if not eof:
                    return False
                raise MalformedCallError("the stream ended inside the call")
            if self._call_index is None:
                raise MalformedCallError("no function name")
            if not self._call_args:
                self._args("{}")  # a call without arguments takes none
            if not isinstance(decode(self._call_args), dict):
                raise MalformedCallError("arguments are not a JSON object")
        except MalformedCallError as exc:
            if eof and self._cut:  # unwritten, not malformed: neither a call nor content
                logger.debug("tool call cut short, dropped: %s", exc)
                self._in_call, self._buf = False, ""
                return False
            logger.debug("tool call markup treated as text: %s", exc)
            self._in_call = False
            # The call's text goes back to being content; only its START is known not to be
            # markup, so what follows it is scanned again (it may hold a real call).
            self._content(self._lead_ws + self.START)
            return True
        self._calls.append(ToolCall(self._call_id, self._call_name, self._call_args))
        self._buf = self._buf[self._pos :]
        self._in_call = False
        self._after_call = True
        return True

    # --- helpers for subclasses ------------------------------------------------------------

    def _content(self, text: str) -> None:
        if text:
            self._after_call = False
            self._events.append(ContentDelta(text))

    def _start(self, name: str) -> None:
        """Announce the open call once its function name is known."""
        self._call_index, self._next_index = self._next_index, self._next_index + 1
        self._call_id = "call_" + secrets.token_hex(12)
        self._call_name = name
        self._events.append(ToolCallStart(self._call_index, self._call_id, name))

    def _args(self, text: str) -> None:
        """Stream a piece of the open call's arguments (the call must have started)."""
        if text and self._call_index is not None:
            self._call_args += text
            self._events.append(ToolCallArgs(self._call_index, text))

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _reset_call(self) -> None:
        """Prepare the format scanner for a new call body."""
        raise NotImplementedError

    def _scan(self, eof: bool) -> bool:
        """Read the call body from `_buf[_pos:]`, advancing `_pos`.

        Args:
            eof: No more text will come.

        Returns:
            True once the call's end markup is consumed, False if more text is needed.

        Raises:
            MalformedCallError: The text does not follow the format.
        """
        raise NotImplementedError
