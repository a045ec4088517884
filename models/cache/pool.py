"""Storage that grows and shrinks with what it holds: units (blocks or rows) and a free list.

A ``Pool`` owns, for each of its layers, arrays holding ``capacity`` units (``unit`` =
positions per block for positional layers, 1 for recurrent rows). A unit of one position
(recurrent rows) is a leading index: ``[capacity, *shape]``. A block of positions is stored
head-major, as attention reads it: a per-position shape ``[H, D]`` is kept as a 2-D array
``[capacity × H × unit, D]`` whose rows run block, then head, then position in the block
(``rows``), so each head's ``unit`` keys of a block are one contiguous ``[unit, D]`` matrix
that a paged attention can multiply in place (``models.backend.paged``). Ids are handed
out from a free list, so a row joins or leaves by taking or returning its own ids: nothing
else is copied. Capacity follows use: it grows by an eighth (copying once, amortised) when an
allocation does not fit, and ``compact`` shrinks it when less than four fifths is in use,
renumbering the live ids (the caller remaps its tables).

Knows arrays, ids and bytes; not rows, positions or attention.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np


class Pool:
    """Per-layer arrays of ``capacity`` units, and which units are free.

    Args:
        shapes: Layer index -> the per-position (or per-row) shapes of its tensors.
        unit: Leading-axis entries per id (``BLOCK`` for blocks, 1 for recurrent rows).
        dtype: Element type.
        dtypes: Per layer, an element type for each array instead (quantized storage keeps
            ``uint32`` words beside scales in ``dtype``).
    """

    def __init__(
        self,
        shapes: dict[int, tuple[tuple[int, ...], ...]],
        unit: int,
        dtype: mx.Dtype,
        dtypes: dict[int, tuple[mx.Dtype, ...]] | None = None,
    ):
        self.shapes = shapes
        self.unit = unit
        self.dtype = dtype
        self.dtypes = dtypes or {layer: (dtype,) * len(s) for layer, s in shapes.items()}
        self.capacity = 0
        self.free: list[int] = []
        self.arrays: dict[int, list[mx.array]] = {layer: [] for layer in shapes}
        self.unit_bytes = unit * sum(
            t.size * math.prod(s)
            for layer, per_layer in shapes.items()
            for s, t in zip(per_layer, self.dtypes[layer])
        )

    @property
    def blocked(self) -> bool:
        """Whether units are blocks of positions, stored head-major (else one leading index)."""
        return self.unit > 1

    def rows(self, lead: int, slots: mx.array | np.ndarray) -> mx.array | np.ndarray:
        """Rows of a blocked ``[capacity × lead × unit, D]`` array holding ``slots``.

        Args:
            lead: The tensor's ``H`` (the product of its per-position shape but the last).
            slots: Positions in the pool (``id × unit + offset``), any shape ``I``, int32;
                an MLX array, or a NumPy one (the views compute a pass's indices on the
                host, once, rather than as graph operations in every layer).

        Returns:
            int32 ``[*I, lead]`` of the same kind: row of head h of each slot.
        """
        block, offset = slots // self.unit, slots % self.unit
        heads = np.arange(lead, dtype=np.int32) * self.unit
        if isinstance(slots, mx.array):
            heads = mx.array(heads)
        return (block * (lead * self.unit) + offset)[..., None] + heads

    def stored_shape(self, shape: tuple[int, ...], units: int) -> tuple[int, ...]:
        """The stored shape of ``units`` units of a tensor with per-position ``shape``."""
        if not self.blocked:
            return (units, *shape)
        return (units * self.unit * math.prod(shape[:-1]), shape[-1])

    @property
    def used(self) -> int:
        """Ids handed out."""
        return self.capacity - len(self.free)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, used or not)."""
        return self.capacity * self.unit_bytes

    def allocate(self, n: int, limit_bytes: int | None = None) -> list[int]:
        """Hand out ``n`` ids, growing the arrays if the free list is short.

        Args:
            n: Ids wanted.
            limit_bytes: Growth beyond what is needed stops here (the slack never exceeds the
                budget); what is needed is always allocated.

        Returns:
            The ids (the lowest free ones first, which keeps a row's blocks near each other).
        """
        if n > len(self.free):
            need = self.used + n
            target = max(need, self.capacity + self.capacity // 8 + 1)
            if limit_bytes is not None:
                target = max(need, min(target, limit_bytes // self.unit_bytes))
            self._grow(target)
        return [self.free.pop() for _ in range(n)]

    def release(self, ids: list[int]) -> None:
        """Return ids to the free list."""
        self.free.extend(ids)
        self.free.sort(reverse=True)

    def wasteful(self) -> bool:
        """Whether more than an eighth (plus two units) of the capacity is idle (then ``compact``).

        An eighth, because the memory held is to follow the tokens held within a quarter,
        and each row's part-filled last block already costs some of that. The two spare
        units spare small pools from compacting back and forth; they do not apply to an idle
        pool: once its last row leaves, it holds nothing.
        """
        if self.used == 0:
            return self.capacity > 0
        return self.capacity > self.used + self.used // 8 + 2

    def compact(self, live: list[int]) -> dict[int, int]:
        """Shrink to fit ``live`` (every id in use) plus a sixteenth; renumber them 0..n-1.

        Costs a copy of what is live, so it runs only when an eighth of the capacity is
        idle: amortised over the rows whose leaving freed it.

        Args:
            live: The ids in use, in the order they are to be numbered.

        Returns:
            Old id -> new id.
        """
        capacity = len(live) + len(live) // 16 + (1 if live else 0)
        if not live:
            self._set(capacity, lambda a, rows: None)
        else:
            ids = mx.array(live, dtype=mx.int32)

            def keep(a: mx.array, rows: int) -> mx.array:  # rows: stored rows per unit
                idx = ids if rows == 1 else (ids[:, None] * rows + mx.arange(rows)).reshape(-1)
                return a[idx]

            self._set(capacity, keep)
        self.free = list(range(capacity - 1, len(live) - 1, -1))
        return {old: new for new, old in enumerate(live)}

    def _grow(self, capacity: int) -> None:
        """Extend the arrays to ``capacity`` units; every id stays where it is."""
        self.free = list(range(capacity - 1, self.capacity - 1, -1)) + self.free
        self._set(capacity, lambda a, rows: a)

    def _set(self, capacity: int, keep) -> None:
        """Arrays of ``capacity`` units starting with ``keep(old array, rows per unit)``.

        ``keep`` may return None (nothing kept).
        """
        for layer, shapes in self.shapes.items():
            old = self.arrays[layer] or [None] * len(shapes)
            fresh = []
            for a, shape, dtype in zip(old, shapes, self.dtypes[layer]):
                per_unit = self.stored_shape(shape, 1)[0]
                head = keep(a, per_unit) if a is not None else None
                used = 0 if head is None else head.shape[0]
                full = self.stored_shape(shape, capacity)
                tail = mx.zeros((full[0] - used, *full[1:]), dtype)
                fresh.append(tail if head is None else mx.concatenate([head, tail]))
            self.arrays[layer] = fresh if capacity else []
        mx.eval([a for arrays in self.arrays.values() for a in arrays])
        self.capacity = capacity
        # The old buffers go back to MLX's allocator cache, which keeps at most its limit
        # (32 MiB by default on the CPU; ``mlx_cache_limit_bytes``) and frees the rest, so RSS
        # stays bounded without emptying the cache here: clearing it made every following
        # step's activations fault in fresh pages.
