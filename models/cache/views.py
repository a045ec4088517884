"""What one forward pass sees of the ``CacheStore``: per-layer views over its rows.

``StepCache`` is the ``cache`` argument of a model call: a list with one view per decoder
layer, built by ``CacheStore`` for the rows of the pass and the number of new positions each
writes (a prefill chunk: one row, L positions; a decode step: B rows, one each). Built once
per pass and shared by the layers of a group:

* write indices (where the new positions go in the pool),
* gather indices ``[B, S]`` (the positions each row's queries may see, right-padded; in a
  decode pass, each row's whole blocks, which attention may also read in place: ``PagedKV``),
* the mask: ``"causal"`` for one row of a full-attention prefill; None when every query
  sees every gathered position; otherwise a boolean ``[B, 1, L, S]`` (padding, causality,
  window),
* rotary offsets (an int for one row, an int32 ``[B]`` otherwise).

A positional layer calls ``update_and_fetch(k, v)`` (or any number of tensors, for latent
layers) with ``[B, H, L, D]`` arrays and gets ``[B, H, S, D]`` back (``update_and_page``
may hand back the pool itself instead, for attention that passes both straight to
``backend.sdpa``); a recurrent layer reads
and assigns ``state``. The views know indices and masks; what the layers compute with them
is theirs.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from moeserve.models.backend.paged import PagedKV, page_table
from moeserve.models.cache.kinds import BLOCK
from moeserve.models.cache.store import CacheStore


class _GroupStep:
    """Indices and mask of one group for one pass.

    A decode pass (one new position per row) reads whole blocks: each row's block table,
    padded to the longest, so that attention can read the pool in place (``PagedKV``) and a
    gathered copy covers exactly the same positions; the mask hides the positions after
    the query, the padding and, for a sliding window, what the window has left. Other
    passes (prefill chunks) gather the exact positions the queries may see.
    """

    def __init__(self, store: CacheStore, gi: int, rows: list, new: int) -> None:
        window = store.layout.groups[gi].window
        writes = [store.slots(gi, row, row.length, row.length + new) for row in rows]
        self.blocks: mx.array | None = None
        if new == 1:
            gathers, starts = self._whole_blocks(gi, rows)
        else:
            starts = [0 if window is None else max(0, r.length - window + 1) for r in rows]
            gathers = [store.slots(gi, r, s, r.length + new) for r, s in zip(rows, starts)]
        counts = [len(g) for g in gathers]
        width = max(counts)
        padded = np.zeros((len(rows), width), dtype=np.int64)
        for b, g in enumerate(gathers):
            padded[b, : len(g)] = g
            padded[b, len(g) :] = g[0]  # any slot of the row's own; masked out
        # Index arithmetic stays on the host: done once per pass here, it is one input array
        # per layer, where MLX would run it as several small operations in every layer.
        self._write = np.concatenate(writes).astype(np.int32)
        self._gather = padded.astype(np.int32)  # pool slots [B, S]
        self._pool = store.pools[gi]
        self._memo: dict[tuple[str, int], mx.array] = {}
        self.mask = self._mask(rows, new, window, starts, counts, width)

    @property
    def gather(self) -> np.ndarray:
        """The pool slots ``[B, S]`` each row's queries see (right-padded), on the host."""
        return self._gather

    def _whole_blocks(self, gi: int, rows: list) -> tuple[list[np.ndarray], list[int]]:
        """Every held block of each row: the slots, and the position of each row's first."""
        tables = [np.asarray(r.blocks[gi], dtype=np.int64) for r in rows]
        blocks = np.zeros((len(rows), max(len(t) for t in tables)), dtype=np.int32)
        for b, t in enumerate(tables):
            blocks[b, : len(t)] = t
            blocks[b, len(t) :] = t[0]
        self._blocks = blocks
        self.blocks = mx.array(blocks)
        gathers = [(t[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1) for t in tables]
        return gathers, [r.dropped[gi] * BLOCK for r in rows]

    def by_heads(self, heads: int) -> mx.array:
        """Gather indices ``[B, H, S]`` into a pool array stored ``[capacity × H × BLOCK, D]``.

        Gathering this way lands each row's keys already laid out ``[B, H, S, D]`` and
        contiguous, as attention reads them: a gather ``[B, S]`` then a transpose left a
        strided array that attention had to copy again (or read slowly), which cost more than
        the gather itself on the CPU (bench/cache_views.py).

        Args:
            heads: H of the tensor (its per-position shape is ``[H, D]``).

        Returns:
            The indices, made once per pass for each head count.
        """
        key = ("gather", heads)
        if key not in self._memo:  # the pool's rows [B, S, H], heads leading
            self._memo[key] = mx.array(self._pool.rows(heads, self._gather).swapaxes(1, 2))
        return self._memo[key]

    def write_rows(self, heads: int) -> mx.array:
        """Rows ``[B × L, H]`` of the pool arrays that this pass's new positions go to.

        Args:
            heads: H of the tensor.

        Returns:
            int32 indices, made once per pass for each head count.
        """
        key = ("write", heads)
        if key not in self._memo:
            self._memo[key] = mx.array(self._pool.rows(heads, self._write))
        return self._memo[key]

    def page_table(self, heads: int) -> mx.array:
        """``PagedKV.pages()`` for this decode pass: uint32 ``[B, H, N]`` (made once per H).

        Args:
            heads: H of the tensor.

        Returns:
            Index of head h of block ``blocks[b, n]`` in ``pool.reshape(-1, BLOCK, D)``.
        """
        key = ("pages", heads)
        if key not in self._memo:
            self._memo[key] = page_table(self._blocks, heads)
        return self._memo[key]

    @staticmethod
    def _mask(rows, new, window, starts, counts, width):
        if new > 1 and len(rows) == 1 and starts[0] == 0 and window is None:
            return "causal"  # keys are exactly [0, length + L): bottom-right aligned
        key_pos = np.asarray(starts)[:, None] + np.arange(width)[None]  # [B, S]
        query_pos = np.asarray([r.length for r in rows])[:, None] + np.arange(new)[None]  # [B, L]
        keep = key_pos[:, None, :] <= query_pos[:, :, None]  # causal
        keep &= np.arange(width)[None, None, :] < np.asarray(counts)[:, None, None]  # padding
        if window is not None:
            keep &= key_pos[:, None, :] > query_pos[:, :, None] - window
        if keep.all():
            return None  # every query sees every gathered key
        return mx.array(keep[:, None])  # [B, 1, L, S]


class LayerView:
    """One layer's share of a ``StepCache``."""

    def __init__(self, step: StepCache, layer: int) -> None:
        self._step = step
        self.layer = layer

    @property
    def rope_offset(self) -> int | mx.array:
        """Position of each row's first new token (int for one row, int32 ``[B]`` otherwise)."""
        return self._step.rope_offset

    @property
    def mask(self) -> mx.array | str | None:
        """The attention mask of this layer's group (None for recurrent layers)."""
        gi = self._step.store.group_of.get(self.layer)
        return None if gi is None else self._step.groups[gi].mask

    def update_and_fetch(self, *tensors: mx.array) -> tuple[mx.array, ...]:
        """Write the new positions and return every position the queries may see.

        Args:
            *tensors: ``[B, H, L, D]`` each (keys and values; or a latent layer's tensors).

        Returns:
            ``[B, H, S, D]`` each, right-padded per row (the mask hides the padding).
        """
        group = self._write(tensors)
        return tuple(self._step.store.read_heads(self.layer, group))

    def _write(self, tensors: tuple[mx.array, ...]) -> Any:
        """Store this pass's new positions (``[B, H, L, D]`` each); the group's ``_GroupStep``."""
        store = self._step.store
        group = self._step.groups[store.group_of[self.layer]]
        flat = [t.transpose(0, 2, 1, 3).reshape(-1, t.shape[1], t.shape[3]) for t in tensors]
        store.write(self.layer, [group.write_rows(t.shape[1]) for t in flat], flat)
        return group

    def update_and_page(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """``update_and_fetch`` for attention that hands both straight to ``backend.sdpa``.

        In a decode pass over unquantized storage the keys and values stay in the pool
        (``PagedKV``: a backend that can reads them in place, any other gathers them);
        otherwise they are gathered, as ``update_and_fetch`` does.

        Args:
            keys: ``[B, K, L, D]``.
            values: ``[B, K, L, E]``.

        Returns:
            Keys and values, ``[B, K, S, D|E]`` or ``PagedKV`` of that shape; the same
            positions, under the same mask, either way.
        """
        store = self._step.store
        group = self._step.groups[store.group_of[self.layer]]
        if group.blocks is None or store.layout.quant is not None:
            return self.update_and_fetch(keys, values)
        self._write((keys, values))
        arrays = store.pools[store.group_of[self.layer]].arrays[self.layer]
        return tuple(
            PagedKV(a, t.shape[1], BLOCK, group.blocks, group.page_table(t.shape[1]))
            for a, t in zip(arrays, (keys, values))
        )

    @property
    def state(self) -> list[mx.array]:
        """A recurrent layer's state arrays, ``[B, *shape]`` each (zeros for a new row)."""
        return [a[self._step.slots] for a in self._step.store.states.arrays[self.layer]]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        for a, new in zip(self._step.store.states.arrays[self.layer], arrays):
            a[self._step.slots] = new


class StepCache(list):
    """The per-layer views of one forward pass (a list, as the model protocol wants).

    Args:
        store: The store.
        seq_ids: The rows, in batch order.
        new: New positions per row.
    """

    def __init__(self, store: CacheStore, seq_ids: list[str], new: int) -> None:
        self.store = store
        rows = store.prepare(seq_ids, new)
        self.groups = [_GroupStep(store, gi, rows, new) for gi in range(len(store.pools))]
        offsets = [r.length for r in rows]
        self.rope_offset = offsets[0] if len(rows) == 1 else mx.array(offsets, dtype=mx.int32)
        self.slots = (
            mx.array([r.slot for r in rows], dtype=mx.int32) if store.states is not None else None
        )
        for r in rows:
            r.length += new
        super().__init__(LayerView(self, i) for i in range(len(store.layout.kinds)))

    def arrays(self) -> list[mx.array]:
        """Every pool array this pass writes (to evaluate a chunk that samples nothing)."""
        pools = self.store.pools + ([self.store.states] if self.store.states else [])
        return [a for p in pools for arrays in p.arrays.values() for a in arrays]


class SequenceCache:
    """A cache outside the engine (tests, parity, tools): one store, rows of equal length.

    Passed as a model's ``cache``, each call writes its tokens after the ones before, as a
    growing KV cache does. The first call fixes the number of rows (its input's batch).

    Args:
        store: A store for the model's layout.
        name: Prefix of the rows' names in the store.
    """

    def __init__(self, store: CacheStore, name: str = "solo") -> None:
        self.store = store
        self.name = name
        self.seq_ids: list[str] = []

    @property
    def offset(self) -> int:
        """Positions computed (0 before the first call)."""
        return self.store.rows[self.seq_ids[0]].length if self.seq_ids else 0

    def begin(self, batch: int, new: int) -> StepCache:
        """The views for a pass writing ``new`` positions to each of ``batch`` rows.

        Args:
            batch: Rows of the input (the same in every call).
            new: New tokens per row.

        Returns:
            The per-layer views.
        """
        if not self.seq_ids:
            self.seq_ids = [f"{self.name}/{b}" for b in range(batch)]
            for seq_id in self.seq_ids:
                self.store.add(seq_id)
        if batch != len(self.seq_ids):
            raise ValueError(f"this cache holds {len(self.seq_ids)} rows; the input has {batch}")
        return StepCache(self.store, self.seq_ids, new)
