"""Rotary embeddings as an operation: the schedule ``mx.fast.rope`` needs, and the CPU's tables.

``RopeSchedule`` is what a rotation needs besides its input and positions (rotated channels,
base or explicit periods, position scale); ``models/layers/rope.py`` builds one per layer from
the config, and the backend applies it.

On the CPU, ``mx.fast.rope`` has no kernel: every call expands into ~20 small ops that
recompute the cosines and sines, and a decode step calls it twice per layer with the same
positions. ``RopeTables`` computes the table once per (schedule, positions) by rotating a
probe of ones and zeros through ``mx.fast.rope`` itself, so the table is exactly MLX's, and
``rotate`` applies the same products in the same order as MLX's own CPU path: the output is
bitwise identical, with about a third of the ops (``tests/unit/test_rope_table.py``).

A table is shared within one forward pass only (``models.backend.forward_pass``): every
layer's cache then holds the same rows at the same positions (the mask is built once for
the whole stack on the same grounds), so the pass itself is the key and the caches need no
key of their own. This module knows nothing about caches or layers.
"""

from __future__ import annotations

from collections.abc import Hashable

import mlx.core as mx


class RopeSchedule:
    """The frequency schedule of one rotary embedding; equal schedules share tables.

    Args:
        dims: Rotated channels per head (the first ``dims``; non-interleaved halves).
        base: Base of the geometric schedule, or None when ``freqs`` is given.
        scale: Multiplier of the positions (linear scaling: ``1 / factor``).
        freqs: Explicit periods ``[dims / 2]`` (YaRN, Llama 3), or None.
    """

    __slots__ = ("_key", "base", "dims", "freqs", "scale")

    def __init__(self, dims: int, base: float | None, scale: float, freqs: mx.array | None):
        if freqs is not None:
            # Computed now, on the thread that builds the model: a lazy array cannot be
            # evaluated from another thread (the engine's), which has no stream of its own.
            mx.eval(freqs)
        self.dims, self.base, self.scale, self.freqs = dims, base, scale, freqs
        self._key: Hashable | None = None

    @property
    def key(self) -> Hashable:
        """A hashable value equal for equal schedules (read from ``freqs`` on first use)."""
        if self._key is None:
            freqs = None if self.freqs is None else tuple(self.freqs.tolist())
            self._key = (self.dims, self.base, self.scale, freqs)
        return self._key

    def apply(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """``mx.fast.rope`` with this schedule.

        Args:
            x: ``[B, H, L, D]``.
            offset: Position of the first token (int or per-row ``[B]``).

        Returns:
            ``x`` rotated.
        """
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self.freqs,
        )


class RopeTables:
    """The cos/sin tables of one forward pass, by schedule and positions."""

    def __init__(self) -> None:
        self._tables: dict[Hashable, tuple[mx.array, mx.array]] = {}

    def rotate(self, x: mx.array, offset: int | mx.array, schedule: RopeSchedule) -> mx.array:
        """Rotate ``x`` with this pass's table for ``schedule`` (computed on first use).

        Args:
            x: Queries or keys ``[B, H, L, D]``.
            offset: Position of the first token (int or per-row ``[B]``); the same for every
                call of the pass.
            schedule: The layer's schedule.

        Returns:
            ``x`` rotated, bitwise ``schedule.apply(x, offset)``.
        """
        cos, sin = self._table(x, offset, schedule)
        half = schedule.dims // 2
        x1, x2 = x[..., :half], x[..., half : schedule.dims]
        parts = [x1 * cos - x2 * sin, x1 * sin + x2 * cos]  # MLX's products, in MLX's order
        if schedule.dims < x.shape[-1]:
            parts.append(x[..., schedule.dims :])
        return mx.concatenate(parts, axis=-1)

    def __len__(self) -> int:
        return len(self._tables)

    def _table(
        self, x: mx.array, offset: int | mx.array, schedule: RopeSchedule
    ) -> tuple[mx.array, mx.array]:
        """``cos`` and ``sin`` ``[B or 1, 1, L, dims/2]`` in ``x``'s dtype."""
        B, _, L, _ = x.shape
        rows = B if isinstance(offset, mx.array) and offset.size > 1 else 1
        # An int offset is its own key; a per-row array is this pass's positions.
        positions = offset if isinstance(offset, int) else ("rows", rows)
        key = (schedule.key, positions, L, x.dtype)
        table = self._tables.get(key)
        if table is None:
            # Rotating (1, 0) pairs yields (cos, sin) exactly: 1*c - 0*s and 1*s + 0*c.
            half = schedule.dims // 2
            probe = mx.concatenate(
                [mx.ones((rows, 1, L, half), x.dtype), mx.zeros((rows, 1, L, half), x.dtype)],
                axis=-1,
            )
            rotated = schedule.apply(probe, offset)
            table = (rotated[..., :half], rotated[..., half:])
            self._tables[key] = table
        return table
