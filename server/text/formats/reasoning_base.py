r"""The reasoning format base: splitting generated text into reasoning and content as it streams.

A reasoning format is one class (see the package docstring for the registry). At class level
it declares its name and its opening and closing markers, how to recognise it from a chat
template and the vocabulary (`detect`), and whether a rendered prompt leaves generation
already inside a block (`starts_inside`: some templates open the block in the generation
prompt, so generation starts inside it with no opening tag). An instance is the streaming
parser for one response.

Only the leading block is reasoning: once content has started, a later opening marker is
content like any other text, since a model that answers and then "thinks again" is quoting
the tag or misbehaving, and OpenAI-style responses carry one reasoning text before the
answer. Whitespace between blocks is dropped: before the opening tag and between the closing
tag and the first content (templates write `</think>\n\n` there; it separates, it is not
answer text). Reasoning text itself is passed on verbatim.

It does not know tokens, tool calls (the tool-call parser reads the content this produces)
or HTTP, and it does not stop or budget reasoning.
"""

from __future__ import annotations

from collections.abc import Container
from typing import ClassVar

from moeserve.server.text.formats.tool_base import partial_marker_len


class ReasoningFormat:
    """One reasoning format; an instance splits one response into reasoning and content text.

    Text that may still turn out to be a marker (a split `<th`, `</thi`, or whitespace before
    a possible opening tag) is held back until the next chunk decides it; markers are never
    emitted. Text that never opens a block is all content.

    Args:
        starts_inside: Generation begins inside an open block (see `starts_inside`).

    Raises:
        ValueError: The format declares an empty marker.
    """

    name: ClassVar[str] = ""
    START: ClassVar[str] = ""
    END: ClassVar[str] = ""

    @classmethod
    def markers(cls) -> tuple[str, ...]:
        """Markup the parser must see even where a tokenizer makes it a special token."""
        return (cls.START, cls.END)

    @classmethod
    def detect(cls, chat_template: str | None, vocabulary: Container[str]) -> bool:
        """Whether the model writes this format's blocks.

        Args:
            chat_template: The template in use (None: the ChatML fallback, which has none).
            vocabulary: Token texts (e.g. the tokenizer's vocabulary dict); the opening marker
                as a token counts as well as a mention in the template.

        Returns:
            True when the template or the vocabulary has the opening marker.
        """
        mentioned = chat_template is not None and cls.START in chat_template
        return mentioned or cls.START in vocabulary

    @classmethod
    def starts_inside(cls, rendered_generation_prompt: str) -> bool:
        """Whether generation starts inside a block the template opened.

        Only the very end counts: a user message quoting the marker earlier in the prompt,
        or a closed empty block (thinking switched off), leaves generation outside a block.

        Args:
            rendered_generation_prompt: A prompt rendered with the generation prompt (all of
                it or only its end), with the request's template variables such as
                `enable_thinking`, since they decide whether the template opens the block.

        Returns:
            True when the prompt ends (trailing whitespace aside) with the opening marker.
        """
        return rendered_generation_prompt.rstrip().endswith(cls.START)

    # States: before the (optional) leading block, inside it, right after it, in content.
    _BEFORE, _INSIDE, _AFTER, _CONTENT = range(4)

    def __init__(self, starts_inside: bool = False) -> None:
        if not self.START or not self.END:
            raise ValueError(f"reasoning format {self.name!r}: markers must be non-empty")
        self._state = self._INSIDE if starts_inside else self._BEFORE
        self._buf = ""
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """Whether the stream is (so far) inside the reasoning block."""
        return self._state == self._INSIDE

    def feed(self, text: str) -> tuple[str, str]:
        """Add newly generated text.

        Args:
            text: The next chunk, split anywhere (even inside a marker).

        Returns:
            (reasoning_delta, content_delta): the text this chunk decided, either may be "".

        Raises:
            RuntimeError: `finish` was already called.
        """
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._drain(eof=False)

    def finish(self) -> tuple[str, str]:
        """End the stream; held-back text goes where it was heading.

        An unfinished marker inside the reasoning block is reasoning text; before the block it
        is content; whitespace after the closing marker with no content after it is dropped.

        Returns:
            (reasoning_delta, content_delta) of the held-back text.
        """
        if self._finished:
            return "", ""
        self._finished = True
        return self._drain(eof=True)

    def _drain(self, eof: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while self._buf:
            if self._state == self._BEFORE:
                stripped = self._buf.lstrip()
                if stripped.startswith(self.START):
                    self._buf = stripped[len(self.START) :]
                    self._state = self._INSIDE
                elif self.START.startswith(stripped) and not eof:
                    break  # whitespace and perhaps part of the tag: undecided
                else:
                    self._state = self._CONTENT
            elif self._state == self._INSIDE:
                found = self._buf.find(self.END)
                if found >= 0:
                    reasoning.append(self._buf[:found])
                    self._buf = self._buf[found + len(self.END) :]
                    self._state = self._AFTER
                    continue
                keep = 0 if eof else partial_marker_len(self._buf, self.END)
                reasoning.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break
            elif self._state == self._AFTER:
                self._buf = self._buf.lstrip()  # all-whitespace so far: wait for content
                if self._buf:
                    self._state = self._CONTENT
            else:
                content.append(self._buf)
                self._buf = ""
        return "".join(reasoning), "".join(content)
