"""Every running sequence's cache state, in memory that follows the tokens held.

``CacheStore`` keeps, per group of positional layers (``kinds.Group``), one ``Pool`` of
``BLOCK``-position blocks and, per row, a block table; recurrent layers keep one ``Pool`` of
per-row slots. A forward pass over some rows starts with ``step(seq_ids, new)``, which hands
out the blocks the new positions need, frees sliding-window blocks nobody can see any more,
and returns the per-layer views the model writes into and reads from (``views.StepCache``).
A row joins with ``add`` (or ``adopt``, from a prompt-cache snapshot) and leaves with
``remove``: each costs that row's blocks, never a copy of the others. The store may compact
a pool after rows leave (amortised: only when a quarter of it is idle).

Knows positions, block ids, slots and bytes; not tokens, sampling or scheduling (the
scheduler keeps the byte budget with ``kinds.CacheLayout``; ``max_bytes`` here only stops
spare capacity from growing past it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from moeserve.models.cache.kinds import BLOCK, CacheLayout, Recurrent
from moeserve.models.cache.pool import Pool


@dataclass
class Row:
    """One sequence's place in the store."""

    length: int = 0  # positions computed
    blocks: list[list[int]] = field(default_factory=list)  # per group: the block table
    dropped: list[int] = field(default_factory=list)  # per group: leading blocks freed (sliding)
    slot: int | None = None  # recurrent state slot


@dataclass
class Snapshot:
    """A copy of one row's state, independent of the store (what the prompt cache keeps).

    ``layers[i]`` holds layer i's tensors: for a positional layer each is ``[1, H, n, D]``
    covering positions ``[starts[i], length)``; for a recurrent layer each is ``[1, *shape]``,
    exact at ``length`` only. ``boundaries`` holds earlier recurrent states by position (the
    end of the prompt), each a list over the recurrent layers.
    """

    length: int
    layers: list[tuple[mx.array, ...]]
    starts: list[int]
    boundaries: dict[int, list[tuple[mx.array, ...]]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        arrays = [a for t in self.layers for a in t]
        arrays += [a for states in self.boundaries.values() for t in states for a in t]
        return sum(a.nbytes for a in arrays)


class CacheStore:
    """The cache state of every running row.

    Args:
        layout: The model's kinds, grouped.
        dtype: Element type of the cache.
        max_bytes: Spare capacity never grows past this (None: unbounded).
    """

    def __init__(self, layout: CacheLayout, dtype: mx.Dtype, max_bytes: int | None = None):
        self.layout = layout
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.pools = [self._positional_pool(g.layers) for g in layout.groups]
        self.group_of = {i: gi for gi, g in enumerate(layout.groups) for i in g.layers}
        self.states = (
            Pool({i: layout.kinds[i].shapes for i in layout.recurrent}, 1, dtype)
            if layout.recurrent
            else None
        )
        self.rows: dict[str, Row] = {}

    def _positional_pool(self, layers: tuple[int, ...]) -> Pool:
        """The block pool of one group: each tensor as is, or as quantized words and scales."""
        quant = self.layout.quant
        if quant is None:
            return Pool({i: self.layout.kinds[i].token_shapes() for i in layers}, BLOCK, self.dtype)
        stored = {
            i: [a for s in self.layout.kinds[i].token_shapes() for a in quant.stored(s, self.dtype)]
            for i in layers
        }
        return Pool(
            {i: tuple(s for s, _ in arrays) for i, arrays in stored.items()},
            BLOCK,
            self.dtype,
            {i: tuple(t for _, t in arrays) for i, arrays in stored.items()},
        )

    def write(self, layer: int, rows: list[mx.array], values: list[mx.array]) -> None:
        """Store a positional layer's tensors (``[N, H, D]`` each) at their pool rows.

        Args:
            layer: The layer.
            rows: For each tensor, its rows ``[N, H]`` in the pool arrays (``Pool.rows`` of
                the slots written; the views make them once per pass).
            values: The tensors.
        """
        arrays = self.pools[self.group_of[layer]].arrays[layer]
        quant = self.layout.quant
        for j, (v, at) in enumerate(zip(values, rows)):
            if quant is None:
                arrays[j][at] = v
            else:
                quant.write(arrays[3 * j : 3 * j + 3], at, v)

    def read(self, layer: int, index: mx.array) -> list[mx.array]:
        """A positional layer's tensors at pool slots ``index`` (shape ``I``): ``[*I, H, D]``."""
        pool = self.pools[self.group_of[layer]]
        arrays = pool.arrays[layer]
        quant = self.layout.quant
        heads = self.layout.kinds[layer].token_shapes()
        if quant is None:
            return [a[pool.rows(h[0], index)] for a, h in zip(arrays, heads)]
        return [
            quant.read(arrays[3 * j : 3 * j + 3], pool.rows(h[0], index), self.dtype)
            for j, h in enumerate(heads)
        ]

    def read_heads(self, layer: int, group: Any) -> list[mx.array]:
        """A positional layer's tensors for one pass, ``[B, H, S, D]`` each, contiguous.

        Args:
            layer: The layer.
            group: The pass's ``views._GroupStep`` of the layer's group (its ``by_heads``).

        Returns:
            The tensors, dequantized if stored quantized.
        """
        arrays = self.pools[self.group_of[layer]].arrays[layer]
        heads = [h[0] for h in self.layout.kinds[layer].token_shapes()]
        quant = self.layout.quant
        if quant is None:
            return [a[group.by_heads(h)] for a, h in zip(arrays, heads)]
        return [
            quant.dequantize([a[group.by_heads(h)] for a in arrays[3 * j : 3 * j + 3]], self.dtype)
            for j, h in enumerate(heads)
        ]

    # ----- accounting ---------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes allocated for rows (pool capacities, used or spare)."""
        return sum(p.nbytes for p in self._all_pools())

    @property
    def tokens(self) -> int:
        """Positions the rows hold (each row's length)."""
        return sum(r.length for r in self.rows.values())

    def _all_pools(self) -> list[Pool]:
        return self.pools + ([self.states] if self.states is not None else [])

    def _limit(self, pool: Pool) -> int | None:
        """How large ``pool`` may grow with spare capacity (the budget less the others)."""
        if self.max_bytes is None:
            return None
        return self.max_bytes - (self.nbytes - pool.nbytes)

    # ----- rows ---------------------------------------------------------------------------

    def add(self, seq_id: str) -> Row:
        """Make an empty row for ``seq_id``.

        Args:
            seq_id: The sequence.

        Returns:
            The row.
        """
        if seq_id in self.rows:
            raise ValueError(f"row {seq_id!r} already exists")
        row = Row(blocks=[[] for _ in self.pools], dropped=[0] * len(self.pools))
        if self.states is not None:
            (row.slot,) = self.states.allocate(1, self._limit(self.states))
            slot = mx.array([row.slot], dtype=mx.int32)
            for arrays in self.states.arrays.values():
                for a in arrays:  # a fresh row starts from a zero state
                    a[slot] = mx.zeros((1, *a.shape[1:]), a.dtype)
        self.rows[seq_id] = row
        return row

    def remove(self, seq_id: str) -> None:
        """Free a row's blocks and slot (unknown ids are ignored).

        Args:
            seq_id: The sequence.
        """
        row = self.rows.pop(seq_id, None)
        if row is None:
            return
        for pool, blocks in zip(self.pools, row.blocks):
            pool.release(blocks)
        if self.states is not None and row.slot is not None:
            self.states.release([row.slot])
        self._compact()

    def _compact(self) -> None:
        """Shrink pools that are mostly idle, renumbering the rows' ids."""
        for gi, pool in enumerate(self.pools):
            if pool.wasteful():
                mapping = pool.compact([b for r in self.rows.values() for b in r.blocks[gi]])
                for r in self.rows.values():
                    r.blocks[gi] = [mapping[b] for b in r.blocks[gi]]
        if self.states is not None and self.states.wasteful():
            mapping = self.states.compact([r.slot for r in self.rows.values()])
            for r in self.rows.values():
                r.slot = mapping[r.slot]

    # ----- positions ----------------------------------------------------------------------

    def prepare(self, seq_ids: list[str], new: int) -> list[Row]:
        """Give each row blocks for ``new`` more positions; free what sliding windows dropped.

        Args:
            seq_ids: The rows of the coming forward pass.
            new: Positions each row writes in it.

        Returns:
            The rows, lengths not yet advanced.
        """
        rows = [self.rows[s] for s in seq_ids]
        for gi, (group, pool) in enumerate(zip(self.layout.groups, self.pools)):
            for row in rows:
                if group.window is not None:  # the first new query sees from here on
                    first = max(0, row.length - group.window + 1) // BLOCK
                    gone = first - row.dropped[gi]
                    if gone > 0:
                        pool.release(row.blocks[gi][:gone])
                        row.blocks[gi] = row.blocks[gi][gone:]
                        row.dropped[gi] = first
                held = row.dropped[gi] + len(row.blocks[gi])
                wanted = -(-(row.length + new) // BLOCK) - held
                if wanted > 0:
                    row.blocks[gi] += pool.allocate(wanted, self._limit(pool))
        return rows

    def slots(self, gi: int, row: Row, start: int, stop: int) -> np.ndarray:
        """Pool indices of positions ``[start, stop)`` of ``row`` in group ``gi``."""
        pos = np.arange(start, stop)
        table = np.asarray(row.blocks[gi], dtype=np.int64)
        return table[pos // BLOCK - row.dropped[gi]] * BLOCK + pos % BLOCK

    # ----- prompt cache -------------------------------------------------------------------

    def snapshot(self, seq_id: str) -> Snapshot:
        """Copy a row's state out (evaluated, sharing nothing with the pools).

        Args:
            seq_id: The sequence.

        Returns:
            The snapshot at the row's length.
        """
        row = self.rows[seq_id]
        layers: list[tuple[mx.array, ...]] = []
        starts: list[int] = []
        for i, kind in enumerate(self.layout.kinds):
            if isinstance(kind, Recurrent):
                slot = mx.array([row.slot], dtype=mx.int32)
                layers.append(tuple(mx.contiguous(a[slot]) for a in self.states.arrays[i]))
                starts.append(row.length)
                continue
            gi = self.group_of[i]
            start = row.dropped[gi] * BLOCK
            idx = mx.array(self.slots(gi, row, start, row.length))
            layers.append(  # dequantized, if stored quantized: entries stay exact copies
                tuple(mx.contiguous(a[None].transpose(0, 2, 1, 3)) for a in self.read(i, idx))
            )
            starts.append(start)
        mx.eval([a for t in layers for a in t])
        return Snapshot(row.length, layers, starts)

    def recurrent_state(self, seq_id: str) -> list[tuple[mx.array, ...]]:
        """Copies of a row's recurrent states (empty for a model without recurrent layers)."""
        if self.states is None:
            return []
        slot = mx.array([self.rows[seq_id].slot], dtype=mx.int32)
        states = [
            tuple(mx.contiguous(a[slot]) for a in self.states.arrays[i])
            for i in self.layout.recurrent
        ]
        mx.eval([a for t in states for a in t])
        return states

    def adopt(self, seq_id: str, snap: Snapshot, length: int) -> None:
        """Make a row holding the first ``length`` positions of ``snap``.

        ``length`` must be usable (``usable_length``): every positional layer holds what a
        query at ``length`` sees, and the recurrent states are exact there.

        Args:
            seq_id: The new row.
            snap: A snapshot of this store's layout.
            length: Positions to reuse.
        """
        if self.usable_length(snap, length) != length:
            raise ValueError(f"a snapshot of {snap.length} positions cannot resume at {length}")
        row = self.add(seq_id)
        row.length = 0
        recurrent = snap.layers if length == snap.length else None
        if recurrent is None and self.layout.recurrent and length:
            recurrent = {  # an earlier boundary: its states, by layer
                i: s for i, s in zip(self.layout.recurrent, snap.boundaries[length])
            }
        for gi, group in enumerate(self.layout.groups):
            first = 0 if group.window is None else max(0, length - group.window + 1)
            row.dropped[gi] = first // BLOCK
            row.blocks[gi] = self.pools[gi].allocate(
                -(-length // BLOCK) - row.dropped[gi], self._limit(self.pools[gi])
            )
            start = row.dropped[gi] * BLOCK
            slots = np.asarray(self.slots(gi, row, start, length), dtype=np.int32)
            rows_by_heads: dict[int, mx.array] = {}  # the group's layers share head counts
            for i in group.layers:
                offset = start - snap.starts[i]
                parts = [
                    t[0, :, offset : offset + length - start].transpose(1, 0, 2)
                    for t in snap.layers[i]
                ]
                for p in parts:
                    if p.shape[1] not in rows_by_heads:
                        rows_by_heads[p.shape[1]] = mx.array(self.pools[gi].rows(p.shape[1], slots))
                self.write(i, [rows_by_heads[p.shape[1]] for p in parts], parts)
        slot = mx.array([row.slot], dtype=mx.int32) if row.slot is not None else None
        for i in self.layout.recurrent if length else ():  # at 0: add's zero state is exact
            states = recurrent[i] if isinstance(recurrent, dict) else snap.layers[i]
            for a, t in zip(self.states.arrays[i], states):
                a[slot] = t
        row.length = length

    def usable_length(self, snap: Snapshot, length: int) -> int:
        """The longest prefix of at most ``length`` positions that ``snap`` can resume.

        Full and latent layers reuse any prefix; a sliding layer only one whose window it
        still holds; recurrent layers only the positions where their state was taken.

        Args:
            snap: The snapshot.
            length: Positions shared with the new prompt.

        Returns:
            The usable length (0: nothing).
        """
        length = min(length, snap.length)
        if self.layout.recurrent and length != snap.length:
            length = max((p for p in snap.boundaries if p <= length), default=0)
        for group in self.layout.groups:
            if group.window is not None:
                start = max(snap.starts[i] for i in group.layers)
                if max(0, length - group.window + 1) < start:
                    return 0
        return length
