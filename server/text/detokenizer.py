"""Generated token ids to streamed text, one token at a time, never half a character.

This module knows how to decode a small window of ids with a `Tokenizer` and subtract the text
already emitted, holding back text that ends in U+FFFD (an unfinished UTF-8 character) and
dropping special tokens except those the caller keeps. It does not know tokenizer files, chat
templates, stop strings (`stop_strings.StopMatcher` cuts the text this produces), the model,
sampling or HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type here; tokenizer.py imports this module
    from moeserve.server.text.tokenizer import Tokenizer


class StreamingDetokenizer:
    """Turns generated token ids into text one token at a time, in O(1) amortised per token.

    It decodes only a small window: the tokens emitted by the previous step (the prefix) and
    those not yet emitted. Their text minus the prefix's text is the new text. The prefix
    carries the context decoders need, such as SentencePiece's rule that only the very first
    token loses its leading space, and it starts on a character boundary. Text that ends in
    U+FFFD (an unfinished UTF-8 character) is held back until a later token completes it.
    Special tokens are dropped before decoding, as `decode(..., skip_special_tokens=True)`
    does, except those the caller asks to keep (tool-call markers a parser must see). So the
    outputs concatenate to the full decode of the ids whenever their bytes are valid UTF-8;
    invalid bytes still come out as U+FFFD, though SentencePiece byte fallback may then mark a
    different number of characters than a one-shot decode does.

    Args:
        tokenizer: The tokenizer whose `decode` is used.
        keep: Special token ids to keep in the text rather than drop.
    """

    # UTF-8 needs at most 4 bytes, so a character completes within 4 tokens; past this many
    # held tokens the model produced invalid bytes, and they are released as U+FFFD.
    _MAX_HELD = 8

    def __init__(self, tokenizer: Tokenizer, keep: frozenset[int] = frozenset()) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_token_ids - keep
        self._window: list[int] = []
        self._read = 0  # window[:_read] is the prefix; window[_read:] is not yet emitted
        self._prefix_text = ""

    def add(self, token_id: int) -> str:
        """Add one generated token.

        Args:
            token_id: The token id.

        Returns:
            The text this token finalised (often "", sometimes several tokens' worth).
        """
        if token_id in self._skip:
            return ""
        self._window.append(token_id)
        text = self._decode()
        undecided = text.endswith("\ufffd") or len(text) <= len(self._prefix_text)
        if undecided and len(self._window) - self._read < self._MAX_HELD:
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """End the stream.

        Returns:
            The text still held back (possibly ending in U+FFFD if the bytes never completed).
        """
        if len(self._window) == self._read:
            return ""
        return self._emit(self._decode())

    def _decode(self) -> str:
        # Dropped special ids never enter the window, so whatever special token is in it was
        # asked to be kept: decode without skipping.
        return self._tokenizer.decode(self._window, skip_special_tokens=False)

    def _emit(self, text: str) -> str:
        new_text = text[len(self._prefix_text) :]
        # The tokens just emitted become the next prefix; everything older is dropped.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode()
        return new_text
