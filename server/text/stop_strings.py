"""Stop strings: cut a stream of generated text at the first one, across chunk boundaries.

This module knows only text: it holds back the characters that could start a stop string until
the next chunk decides them, and says which stop completed. It does not know token ids,
tokenizers, detokenizing (`detokenizer.StreamingDetokenizer` produces the text it is fed), the
model or HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """Cuts a text stream at the first stop string, even when one spans several chunks.

    Text that could be the start of a stop string is held back until the next chunk decides
    it, never more than `max(len(stop)) - 1` characters. When stop strings overlap, the one
    that completes first in the stream wins; its text and everything after it are dropped.

    Args:
        stops: The stop strings; empty strings are ignored.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self.matched: str | None = None
        self._held = ""

    @property
    def stopped(self) -> bool:
        """Whether a stop string has completed."""
        return self.matched is not None

    def feed(self, text: str) -> tuple[str, bool]:
        """Add newly generated text.

        Args:
            text: The next chunk of text.

        Returns:
            The text safe to emit, and whether a stop string completed (after which every
            further call returns `("", True)`).
        """
        if self.matched is not None:
            return "", True
        buffer = self._held + text
        start = self._find_stop(buffer)
        if start is not None:
            self._held = ""
            return buffer[:start], True
        keep = self._partial_stop_len(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """End the stream.

        Returns:
            The held-back text, which no stop string can complete any more.
        """
        held, self._held = self._held, ""
        return held

    def _find_stop(self, buffer: str) -> int | None:
        # Earliest end wins (what a character-by-character stream would see first); among
        # stops ending at the same place the longest, i.e. earliest start, wins.
        best: tuple[int, int] | None = None
        for stop in self.stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
                self.matched = stop
        return None if best is None else best[1]

    def _partial_stop_len(self, buffer: str) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
