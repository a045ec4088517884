r"""The "harmony" format of OpenAI's gpt-oss: every reply is a run of channelled messages.

After the prompt's ``<|start|>assistant`` the model writes messages such as::

    <|channel|>analysis<|message|>The user wants the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.weather <|constrain|>json<|message|>
    {"city":"Paris"}<|call|>

(one message per line here; the model writes no newlines between them), or, once a tool has
answered, ``<|channel|>final<|message|>It is sunny.<|return|>``.

A message is a header (an optional ``<|start|>`` and role, ``<|channel|>`` and its name, an
optional recipient ``to=...`` before or after the channel, an optional content type such as
``<|constrain|>json``), ``<|message|>``, then its body up to ``<|end|>``, ``<|call|>`` or
``<|return|>``. The analysis channel is reasoning, a message with a recipient is a tool call
(``functions.NAME`` calls NAME; the body is its JSON arguments), anything else (final, a
commentary preamble) is content. So this one format splits reasoning as well as calls
(``SPLITS_REASONING``), and ``<|call|>`` and ``<|return|>`` end the model's turn (``TURN_END``;
gpt-oss's later generation configs list both as EOS, its first ones only ``<|return|>``).

Every marker is a special token of gpt-oss's tokenizer; the server keeps them in the text for
this parser (``MARKERS``). A constrained answer is one call message in the channel-first
spelling the model writes; the turn then ends with EOS (``<|call|>``), so harmony has no
parallel calls in one constrained answer. Like every format here it knows text, not tokens.
"""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Any

from moeserve.server.text.formats.grammar_writer import GrammarWriter
from moeserve.server.text.formats.tool_base import (
    MalformedCallError,
    ReasoningDelta,
    ToolCall,
    ToolFormat,
    decode,
    logger,
    partial_marker_len,
)

_START, _CHANNEL, _MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_ENDS = ("<|end|>", "<|call|>", "<|return|>")  # what closes a message body
# What may open a message: a new turn header, a channel, or (right after the prompt's
# `<|start|>assistant`) the recipient-first spelling ` to=functions.x<|channel|>...`.
_OPENERS = (_START, _CHANNEL, " to=")
_HEADER_MAX = 512  # a header is a few words; longer text before <|message|> is not one
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL_NAME = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_ROLE = re.compile(r"<\|start\|>\s*([^\s<]*)")


class HarmonyFormat(ToolFormat):
    """gpt-oss's harmony messages: analysis -> reasoning, a recipient -> a call, else content.

    Detected from a template that writes ``<|channel|>`` and ``<|message|>``. Text outside any
    message header (a model that skips the format) is content. A call's arguments stream as
    generated; a call whose body is not a JSON object, or a message whose header never ends,
    comes back as content with all of its text (markers included). Messages addressed to a
    recipient are content when the request allows no calls (``tools`` empty or None).

    Args:
        tools: The request's tools; None or empty when the request allows no tool calls.
    """

    name = "harmony"
    START = _CHANNEL
    END = "<|call|>"
    MARKERS = (_START, _CHANNEL, _MESSAGE, "<|constrain|>", "<|end|>", "<|call|>", "<|return|>")
    SPLITS_REASONING = True
    TURN_END = ("<|call|>", "<|return|>")

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """A template that writes harmony's `<|channel|>` and `<|message|>` markers."""
        return _CHANNEL in template and _MESSAGE in template

    @classmethod
    def call_grammar(cls, g: GrammarWriter, i: int, name: str, fn: dict[str, Any]) -> str:
        """``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`` ARGS.

        The message's ``<|call|>`` is the EOS that follows the grammar.
        """
        head = [
            g.mark(_CHANNEL),
            g.literal(f"commentary to=functions.{name} "),
            g.mark("<|constrain|>"),
            g.literal("json"),
            g.mark(_MESSAGE),
        ]
        args = g.json(f"args_{i}", fn["parameters"], not fn.get("strict", False))
        return g.rule(f"call_{i}", " ".join([*head, args]))

    @classmethod
    def grammar(
        cls, g: GrammarWriter, functions: list[tuple[str, dict[str, Any]]], parallel: bool
    ) -> str:
        """One call message, then EOS (a harmony turn ends at its call; `parallel` is moot)."""
        alternatives = [cls.call_grammar(g, i, name, fn) for i, (name, fn) in enumerate(functions)]
        return g.lark(["start: " + " | ".join(alternatives)])

    # --- the streaming parser -------------------------------------------------------------------

    # States: between messages, reading a header, reading a body, in text outside any message.
    _BETWEEN, _HEADER, _BODY, _STRAY = range(4)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._calls_allowed = bool(tools)
        self._state = self._BETWEEN
        # The open message's body: "reasoning", "content", "call", or "text" (content that
        # keeps its markers: a message the model should not write, or a call not allowed).
        self._kind = "content"
        self._raw = ""  # the open message's text so far, markers included
        self._reset_call()

    def _run(self, eof: bool) -> None:
        step = {
            self._BETWEEN: self._between,
            self._HEADER: self._header,
            self._BODY: self._body,
            self._STRAY: self._stray,
        }
        while step[self._state](eof):
            pass

    @property
    def in_reasoning(self) -> bool:
        """Whether the text so far ends inside an analysis message's body."""
        return self._state == self._BODY and self._kind == "reasoning"

    def _drop_unfinished(self) -> None:
        """A cut header, call message or opener is unwritten markup: forget it."""
        if self._state == self._HEADER or (self._state == self._BODY and self._kind == "call"):
            self._buf, self._state = "", self._BETWEEN
        elif self._state == self._BETWEEN:
            self._buf = ""  # at most the beginning of a header marker
        else:  # text outside a message, or a body: a marker cut short is not text
            ends = (_START, _CHANNEL) if self._state == self._STRAY else (*_ENDS, _START)
            keep = max(partial_marker_len(self._buf, m) for m in ends)
            self._buf = self._buf[: len(self._buf) - keep]

    def _between(self, eof: bool) -> bool:
        buf = self._buf
        if not buf:
            return False
        if any(buf.startswith(o) for o in _OPENERS):
            self._state = self._HEADER
            return True
        if not eof and any(o.startswith(buf) for o in _OPENERS):
            return False  # perhaps the beginning of a header
        self._state = self._STRAY
        return True

    def _stray(self, eof: bool) -> bool:
        # Text outside any message runs up to the next header marker.
        found = [i for i in (self._buf.find(_START), self._buf.find(_CHANNEL)) if i >= 0]
        if found:
            self._content(self._buf[: min(found)])
            self._buf = self._buf[min(found) :]
            self._state = self._BETWEEN
            return True
        keep = 0 if eof else max(partial_marker_len(self._buf, m) for m in (_START, _CHANNEL))
        self._content(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return False

    def _header(self, eof: bool) -> bool:
        buf = self._buf
        end = buf.find(_MESSAGE)
        head = buf if end < 0 else buf[:end]
        # A header holds no body end and no second <|start|>: text that does is not a header.
        broken = [i for i in (head.find(m, 1) for m in (*_ENDS, _START)) if i >= 0]
        if broken:
            cut = min(broken)
        elif end < 0 and (eof or len(buf) > _HEADER_MAX):
            cut = len(buf)
        elif end < 0:
            return False
        else:
            self._raw, self._buf = buf[: end + len(_MESSAGE)], buf[end + len(_MESSAGE) :]
            self._open_message(head)
            self._state = self._BODY
            return True
        logger.debug("harmony header treated as text: %r", buf[:cut][:80])
        self._content(buf[:cut])
        self._buf = buf[cut:]
        self._state = self._BETWEEN if broken else self._STRAY
        return True

    def _open_message(self, head: str) -> None:
        role, recipient = _ROLE.match(head), _RECIPIENT.search(head)
        channel = _CHANNEL_NAME.search(head)
        if role is not None and role.group(1) != "assistant":
            self._kind = "text"  # another role's turn, which the model should not write
        elif recipient is not None and not self._calls_allowed:
            self._kind = "text"
        elif recipient is not None:
            self._kind = "call"
            self._call_index, self._call_name, self._call_args = None, "", ""
            self._reset_call()
            name = recipient.group(1).removeprefix("functions.")
            if name:
                self._start(name)
        elif channel is not None and channel.group(1) == "analysis":
            self._kind = "reasoning"
        else:
            self._kind = "content"
        if self._kind == "text":
            self._content(self._raw)

    def _body(self, eof: bool) -> bool:
        if self._kind == "call":
            done = self._scan(eof)
        else:
            text, done = self._take_body(eof)
            if self._kind == "reasoning":
                if text:
                    self._events.append(ReasoningDelta(text))
            else:
                self._content(text + (self._marker if self._kind == "text" else ""))
        if not done:
            return False
        self._state = self._BETWEEN
        if self._kind == "call":
            self._close_call()
        return True

    def _take_body(self, eof: bool) -> tuple[str, bool]:
        """The body text decided so far, and whether the message ended (at a marker or EOF).

        The end marker goes to `_marker` ("" when the stream ended or a new `<|start|>`
        began without one, which is left for the next message).
        """
        buf = self._buf
        found = [(i, m) for m in (*_ENDS, _START) if (i := buf.find(m)) >= 0]
        if found:
            pos, marker = min(found)
            self._marker = "" if marker == _START else marker
            self._buf = buf[pos + len(self._marker) :]
            done = True
        else:
            keep = 0 if eof else max(partial_marker_len(buf, m) for m in (*_ENDS, _START))
            pos, self._marker, done = len(buf) - keep, "", eof
            self._buf = buf[pos:]
        self._raw += buf[:pos] + self._marker
        return buf[:pos], done

    def _close_call(self) -> None:
        try:
            if self._call_index is None:
                raise MalformedCallError("no function name")
            if not self._call_args:
                self._args("{}")  # a call without arguments takes none
            if not isinstance(decode(self._call_args), dict):
                raise MalformedCallError("arguments are not a JSON object")
        except MalformedCallError as exc:
            logger.debug("harmony call treated as text: %s", exc)
            self._content(self._raw)
            return
        self._calls.append(ToolCall(self._call_id, self._call_name, self._call_args))

    # The call body is its JSON arguments, streamed without the whitespace around them.

    def _reset_call(self) -> None:
        self._pending = ""  # trailing whitespace, held until text follows it
        self._marker = ""

    def _scan(self, eof: bool) -> bool:
        """Stream the call's arguments up to its body's end; True once the body ended."""
        text, done = self._take_body(eof)
        text = self._pending + text
        if not self._call_args:
            text = text.lstrip()
        body = text.rstrip()
        self._pending = "" if done else text[len(body) :]
        self._args(body)
        return done


FORMAT = HarmonyFormat  # what the registry (formats/__init__.py) lists
