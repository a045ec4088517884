"""Quantized storage of positional cache tensors (``kv_cache_bits`` = 8 or 4).

Each per-position tensor ``[H, D]`` is kept as MLX's affine quantization along ``D``
(``mx.quantize``): packed ``uint32`` words ``[H, D * bits / 32]`` plus a scale and a bias per
group of ``group_size`` values, ``[H, D / group_size]`` each, in the cache dtype. New
positions are quantized as they are written; what a pass gathers is dequantized before
attention (``mx.dequantize``), so the attention kernels are unchanged. Recurrent state is
never quantized (it is small, and an error there compounds every step).

Knows the stored shapes, the bytes they cost and the two conversions; not which layers use it
(``CacheLayout``) or where the arrays live (``Pool``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

Shape = tuple[int, ...]


@dataclass(frozen=True)
class KVQuant:
    """How positional tensors are stored quantized."""

    bits: int  # 8 or 4
    group_size: int  # values sharing one scale and bias (64, or 32 for narrow heads)

    @classmethod
    def for_shapes(cls, bits: int, shapes: list[Shape]) -> KVQuant:
        """The quantization of ``bits`` for tensors of these ``[H, D]`` shapes.

        Args:
            bits: 8 or 4.
            shapes: Every positional tensor's per-position shape.

        Returns:
            The settings, with the largest group size (64 or 32) that divides every ``D``.

        Raises:
            ValueError: Unsupported bits, or a ``D`` that 32 does not divide.
        """
        if bits not in (4, 8):
            raise ValueError(f"kv_cache_bits must be 8 or 4, got {bits}")
        for group in (64, 32):
            if all(s[-1] % group == 0 for s in shapes):
                return cls(bits, group)
        raise ValueError(
            "kv_cache_bits needs every cached head dimension to be a multiple of 32, got "
            + ", ".join(str(s[-1]) for s in shapes)
        )

    def stored(self, shape: Shape, dtype: mx.Dtype) -> tuple[tuple[Shape, mx.Dtype], ...]:
        """The arrays one ``[H, D]`` tensor is kept as: words, scales, biases.

        Args:
            shape: The per-position shape.
            dtype: The cache dtype (of scales and biases).

        Returns:
            ``((shape, dtype), ...)`` for the three arrays.
        """
        *lead, d = shape
        groups = d // self.group_size
        return (
            ((*lead, d * self.bits // 32), mx.uint32),
            ((*lead, groups), dtype),
            ((*lead, groups), dtype),
        )

    def position_bytes(self, shape: Shape, itemsize: int) -> int:
        """Bytes one position of a ``shape`` tensor costs stored this way."""
        *lead, d = shape
        lead_size = math.prod(lead)
        return lead_size * (d * self.bits // 8 + 2 * (d // self.group_size) * itemsize)

    def write(self, arrays: list[mx.array], index: mx.array, values: mx.array) -> None:
        """Quantize ``values`` ``[N, H, D]`` into ``arrays`` (words, scales, biases) at ``index``.

        Args:
            arrays: The three stored arrays of one tensor.
            index: Rows of the stored arrays ``[N, H]`` (``Pool.rows``).
            values: The new positions.
        """
        parts = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for array, part in zip(arrays, parts):
            array[index] = part.astype(array.dtype)

    def dequantize(self, parts: list[mx.array], dtype: mx.Dtype) -> mx.array:
        """Values from gathered words, scales and biases (any leading shape), in ``dtype``.

        Args:
            parts: The three arrays, gathered alike.
            dtype: The result's dtype.

        Returns:
            ``[..., D]``.
        """
        words, scales, biases = parts
        out = mx.dequantize(words, scales, biases, group_size=self.group_size, bits=self.bits)
        return out.astype(dtype)

    def read(self, arrays: list[mx.array], index: mx.array, dtype: mx.Dtype) -> mx.array:
        """The dequantized values at ``index``.

        Args:
            arrays: The three stored arrays of one tensor.
            index: Rows of the stored arrays, any shape ``I`` (``Pool.rows``).
            dtype: The result's dtype.

        Returns:
            ``[*I, D]``.
        """
        words, scales, biases = (a[index] for a in arrays)
        out = mx.dequantize(words, scales, biases, group_size=self.group_size, bits=self.bits)
        return out.astype(dtype)
