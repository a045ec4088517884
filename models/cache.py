"""KV caches that the attention layers write into.

Two shapes of cache exist, both per layer:

* ``KVCache`` holds one sequence (or a batch whose rows all have the same length): prefill,
  chunked prefill and single-stream decode use it, and the prompt-cache manager stores it.
* ``BatchKVCache`` holds the decoding batch. Rows are *left-padded* so that every row's next
  token lands in the same column: one decode step writes one column for all rows. Rows join
  (``extend``) and leave (``filter``) between steps without recomputing the others.

The caches know nothing about scheduling or sessions; they store arrays and say where each
row's positions start.
"""

from __future__ import annotations

import mlx.core as mx

# Buffers grow in steps of this many positions so that decode does not reallocate every token.
_STEP = 256


def _grow(buf: mx.array | None, needed: int, like: mx.array) -> mx.array:
    """Return ``buf`` with room for at least ``needed`` positions along axis 2."""
    B, H, _, D = like.shape
    capacity = ((needed + _STEP - 1) // _STEP) * _STEP
    fresh = mx.zeros((B, H, capacity, D), dtype=like.dtype)
    if buf is None:
        return fresh
    used = buf.shape[2]
    return mx.concatenate([buf, fresh[:, :, used:]], axis=2) if capacity > used else buf


class _GrowingKV:
    """Key/value buffers with spare capacity along the sequence axis.

    Shapes: keys/values ``[B, H_kv, capacity, D]``; the first ``offset`` columns are valid.
    Writing into spare capacity keeps decode from copying the whole cache every token.
    """

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append new keys/values and return everything cached so far.

        Args:
            keys: ``[B, H_kv, L, D]`` for the new tokens.
            values: ``[B, H_kv, L, D]``.

        Returns:
            Keys and values ``[B, H_kv, offset + L, D]``.
        """
        end = self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self.keys = _grow(self.keys, end, keys)
            self.values = _grow(self.values, end, values)
        self.keys[:, :, self.offset : end] = keys
        self.values[:, :, self.offset : end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        """The valid keys and values (trimmed to ``offset``), or None when empty."""
        if self.keys is None or self.offset == 0:
            return None
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    @property
    def nbytes(self) -> int:
        """Bytes held by the valid part of the cache."""
        state = self.state
        return 0 if state is None else state[0].nbytes + state[1].nbytes


class KVCache(_GrowingKV):
    """Keys and values for one sequence (or rows that all have the same length)."""

    @property
    def rope_offset(self) -> int:
        """Position of the next token, for rotary embeddings."""
        return self.offset

    @classmethod
    def from_state(cls, keys: mx.array, values: mx.array) -> KVCache:
        """Build a cache holding ``keys``/``values`` (``[B, H_kv, S, D]``) as its first S positions.

        Args:
            keys: Cached keys.
            values: Cached values.

        Returns:
            A cache whose ``offset`` is S.
        """
        cache = cls()
        cache.keys, cache.values, cache.offset = keys, values, keys.shape[2]
        return cache

    def trim(self, n: int) -> int:
        """Forget the last ``n`` positions (a prompt-cache hit that diverges early).

        Args:
            n: Positions to drop.

        Returns:
            The number actually dropped.
        """
        n = min(self.offset, n)
        self.offset -= n
        return n


def _left_pad(x: mx.array, extra: int) -> mx.array:
    """Pad ``x`` ``[B, H, S, D]`` with ``extra`` zero columns on the left of the sequence axis."""
    return mx.pad(x, [(0, 0), (0, 0), (extra, 0), (0, 0)]) if extra else x


class BatchKVCache(_GrowingKV):
    """Keys and values for a batch of sequences of different lengths, left-padded.

    Row ``b`` holds its tokens in columns ``[left_padding[b], offset)``; the columns before
    are padding that the mask hides. Each row's rotary position is therefore
    ``offset - left_padding[b]``.

    Shapes: keys/values ``[B, H_kv, capacity, D]``, ``left_padding`` int32 ``[B]``.
    """

    def __init__(self, keys: mx.array, values: mx.array, left_padding: list[int]) -> None:
        super().__init__()
        self.keys, self.values, self.offset = keys, values, keys.shape[2]
        self._set_padding(left_padding)

    def _set_padding(self, left_padding: list[int]) -> None:
        self.left_padding = list(left_padding)
        self._pad = mx.array(self.left_padding, dtype=mx.int32)

    @classmethod
    def merge(cls, caches: list[KVCache]) -> BatchKVCache:
        """Stack single-sequence caches into one left-padded batch.

        Args:
            caches: One cache per row (each with batch size 1 and at least one token).

        Returns:
            The batched cache.
        """
        length = max(c.offset for c in caches)
        states = [c.state for c in caches]
        pads = [length - c.offset for c in caches]
        keys = mx.concatenate([_left_pad(k, p) for (k, _), p in zip(states, pads)], axis=0)
        values = mx.concatenate([_left_pad(v, p) for (_, v), p in zip(states, pads)], axis=0)
        return cls(keys, values, pads)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return len(self.left_padding)

    @property
    def rope_offset(self) -> mx.array:
        """Per-row position of the next token, int32 ``[B]``."""
        return self.offset - self._pad

    def lengths(self) -> list[int]:
        """Number of real (non-padding) positions in each row."""
        return [self.offset - p for p in self.left_padding]

    def make_mask(self, length: int) -> mx.array:
        """Boolean mask ``[B, 1, L, offset + L]``: causal, and blind to each row's padding.

        Args:
            length: Number of new query tokens.

        Returns:
            The mask (True = may attend).
        """
        total = self.offset + length
        cols = mx.arange(total)[None, :]  # [1, S]
        rows = mx.arange(self.offset, total)[:, None]  # [L, 1]
        causal = rows >= cols  # [L, S]
        real = cols[None] >= self._pad[:, None, None]  # [B, 1, S]
        return (causal[None] & real)[:, None]  # [B, 1, L, S]

    def filter(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (in that order), then drop all-padding columns.

        Args:
            keep: Row indices to keep (at least one).
        """
        pads = [self.left_padding[i] for i in keep]
        cut = min(pads)
        idx = mx.array(keep, dtype=mx.int32)
        self.keys = self.keys[idx, :, cut : self.offset]
        self.values = self.values[idx, :, cut : self.offset]
        self.offset -= cut
        self._set_padding([p - cut for p in pads])

    def extend(self, other: BatchKVCache) -> None:
        """Append the rows of ``other``, re-padding whichever side is shorter.

        Args:
            other: Another batched cache for the same layer.
        """
        length = max(self.offset, other.offset)
        parts = []
        for c in (self, other):
            k, v = c.state
            extra = length - c.offset
            parts.append(
                (_left_pad(k, extra), _left_pad(v, extra), [p + extra for p in c.left_padding])
            )
        self.keys = mx.concatenate([parts[0][0], parts[1][0]], axis=0)
        self.values = mx.concatenate([parts[0][1], parts[1][1]], axis=0)
        self.offset = length
        self._set_padding(parts[0][2] + parts[1][2])

    def extract(self, row: int) -> KVCache:
        """Copy one row out as a single-sequence cache (without its padding).

        Args:
            row: Row index.

        Returns:
            A ``KVCache`` holding that row's real positions.
        """
        pad = self.left_padding[row]
        sl = slice(row, row + 1)
        return KVCache.from_state(
            self.keys[sl, :, pad : self.offset], self.values[sl, :, pad : self.offset]
        )
