"""RMSNorm with fewer graph ops on MLX's CPU backend, bitwise equal to ``mx.fast.rms_norm``.

``mx.fast.rms_norm`` has no CPU kernel: it expands into about eight small ops (casts, square,
mean, add, rsqrt, two products), and a decode step runs 2L + 1 of them, where every op costs
a few µs of dispatch whatever its size (bench/RESULTS.md, section 6). Here the elementwise
tail after the mean is one compiled kernel, with the same operations in the same order as
MLX's CPU path, so the result is bitwise the same (``tests/unit/test_norm.py``) with three
ops instead of eight. On the GPU, or when ``fastmath`` is off (no JIT compiler), it is
``mx.fast.rms_norm``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models.layers import fastmath


def _tail(x: mx.array, mean_square: mx.array, weight: mx.array, eps: mx.array) -> mx.array:
    out_type = mx.result_type(x, weight)
    y = (x.astype(mx.float32) * mx.rsqrt(mean_square + eps)).astype(out_type)
    return y * weight.astype(out_type)


_tail_c = mx.compile(_tail, shapeless=True)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, in float32 inside.

    Args:
        x: ``[..., M]``.
        weight: ``[M]``.
        eps: Added to the mean square.

    Returns:
        ``x``'s shape, in the promoted dtype of ``x`` and ``weight`` (as MLX's).
    """
    if not fastmath.enabled():
        return mx.fast.rms_norm(x, weight, eps)
    x32 = x.astype(mx.float32)
    mean_square = mx.mean(mx.square(x32), axis=-1, keepdims=True)
    return _tail_c(x, mean_square, weight, mx.array(eps, dtype=mx.float32))


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter, same output) through ``rms_norm`` above."""

    def __call__(self, x: mx.array) -> mx.array:
        """Normalise the last axis.

        Args:
            x: ``[..., dims]``.

        Returns:
            Same shape.
        """
        return rms_norm(x, self["weight"], self.eps)
