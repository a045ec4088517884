"""The CPU backend's compiled kernels: a vectorisable ``exp``, what uses it, and RMSNorm's tail.

Why this exists: on MLX's CPU backend ``mx.exp`` (and so ``softmax``, ``sigmoid``, ``silu``
and the CPU fallback of ``scaled_dot_product_attention``) costs 12-17 ns per element on the
x86-64 machines we measured, 40x a multiply. In a prefill chunk of 512 tokens the attention
softmax and the SwiGLU activations were over half of the forward pass
(``bench/RESULTS.md``, section 6). The exponential here is the textbook one:

1. range reduction: ``n = round(x / ln 2)``, ``r = x - n ln 2`` with ln 2 split into a high
   and a low part (Cody & Waite) so that ``r`` keeps full precision; ``|r| <= ln(2) / 2``;
2. ``e^r`` by a degree-7 polynomial in ``r`` (the minimax coefficients of Cephes' ``expf``,
   S. L. Moshier, 1984), relative error about 1e-7;
3. ``2^n`` built directly as a float32 bit pattern: ``(n + 127) << 23``.

Inputs are clamped to [-88, 88] first, so -inf (masked attention scores) gives exactly 0 and
nothing overflows. Compiled by ``mx.compile`` into loops of plain arithmetic that the C++
compiler vectorises (two kernels and a consumer's tail, see ``_kernels``), it is 3-4x faster
than ``mx.exp`` and more accurate (max relative error 8e-8 against float64, versus 3e-6 for
``mx.exp`` on the same inputs; ``tests/unit/test_fastmath.py``).

``rms_norm`` is the other kernel: ``mx.fast.rms_norm`` has no CPU kernel and expands into
about eight small ops (casts, square, mean, add, rsqrt, two products), where every op costs a
few µs of dispatch whatever its size (bench/RESULTS.md, section 6). Here the elementwise tail
after the mean is one compiled kernel, with the same operations in the same order as MLX's
CPU path, so the result is bitwise the same (``tests/unit/test_norm.py``) in three ops.

This module knows the kernels and whether they work here (MLX JIT-compiles them with the
system C++ compiler; ``available`` probes that once). It does not decide when they are worth
using: every function here always takes the compiled path, and the CPU backend
(``models/backend/cpu.py``) chooses, by device, setting and size, between them and MLX's ops.

Every function computes in float32 and returns its input's dtype (``swiglu``: ``up``'s).
"""

from __future__ import annotations

import logging
import threading

import mlx.core as mx

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI exact in a few bits
_LN2_LO = -2.12194440e-4
# Cephes expf: e^r ~= 1 + r + r^2 * P(r) on |r| <= ln(2)/2.
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1)
_P_LAST = 5.0000001201e-1


# Adding then subtracting 1.5 * 2^23 rounds a float32 to the nearest integer using plain
# additions, which the compiler can vectorise (``floor`` cannot be without SSE4.1, and
# neither is folded away: MLX compiles its kernels without -ffast-math).
_ROUND = 12582912.0


def _reduce(x: mx.array) -> tuple[mx.array, mx.array]:
    """Range reduction of float32 ``x``: ``x = n ln 2 + r`` with integer-valued ``n``."""
    x = mx.clip(x, -88.0, 88.0)
    n = (x * _LOG2E + _ROUND) - _ROUND
    return n, x - n * _LN2_HI - n * _LN2_LO


def _poly(x: mx.array) -> mx.array:
    """``e^r`` for the reduced ``r`` of ``x`` (the factor in front of ``2^n``)."""
    _, r = _reduce(x)
    p = _P[0]
    for c in _P[1:]:
        p = p * r + c
    p = p * r + _P_LAST
    return p * r * r + r + 1.0


def _pow2_bits(x: mx.array) -> mx.array:
    """The float32 bit pattern of ``2^n`` for the ``n`` of ``x``; 0 (i.e. 0.0) at n = -127."""
    n, _ = _reduce(x)
    return mx.left_shift(n.astype(mx.int32) + 127, 23)


def _kernels(pre):
    """Compile ``e^pre(...)`` as two single-output kernels, ``e^r`` and the bits of ``2^n``.

    Two kernels that each recompute the cheap reduction beat one two-output kernel: MLX
    materialises every intermediate that two outputs share. The bit pattern is reinterpreted
    as float32 outside (``view``, free), because a shapeless compiled function cannot trace
    a bit-cast; the consumer multiplies the two inside its own compiled tail.

    Args:
        pre: Elementwise map from the inputs to the float32 exponent.

    Returns:
        A function of the same inputs returning ``(e^r, 2^n)``.
    """
    # shapeless: one trace serves every shape, so decode steps with a new batch size or
    # context length never re-trace.
    poly = mx.compile(lambda *a: _poly(pre(*a)), shapeless=True)
    bits = mx.compile(lambda *a: _pow2_bits(pre(*a)), shapeless=True)
    return lambda *a: (poly(*a), bits(*a).view(mx.float32))


_exp_parts = _kernels(lambda x: x.astype(mx.float32))
_shifted_parts = _kernels(lambda x, m: x.astype(mx.float32) - m.astype(mx.float32))
_neg_parts = _kernels(lambda x: -x.astype(mx.float32))
_exp_tail_c = mx.compile(lambda y, s, like: (y * s).astype(like.dtype), shapeless=True)
_swiglu_tail_c = mx.compile(
    lambda g, y, s, up: (g.astype(mx.float32) / (1.0 + y * s) * up).astype(up.dtype),
    shapeless=True,
)
_masked_tail_c = mx.compile(lambda y, s, keep: mx.where(keep, y * s, 0.0), shapeless=True)


def _fast_exp(x: mx.array) -> mx.array:
    return _exp_tail_c(*_exp_parts(x), x)


def _fast_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu_tail_c(gate, *_neg_parts(gate), up)


def _rms_tail(x: mx.array, mean_square: mx.array, weight: mx.array, eps: mx.array) -> mx.array:
    out_type = mx.result_type(x, weight)
    y = (x.astype(mx.float32) * mx.rsqrt(mean_square + eps)).astype(out_type)
    return y * weight.astype(out_type)


_rms_tail_c = mx.compile(_rms_tail, shapeless=True)


def probe() -> bool:
    """Compile and run the kernels once; False (with a warning) if MLX cannot JIT them here.

    Returns:
        True when every kernel compiled and ran.
    """
    try:
        x = mx.array([-mx.inf, -1.0, 0.0, 1.0])
        mx.eval(_fast_exp(x), _fast_swiglu(x, x))
        mx.eval(_masked_tail_c(*_shifted_parts(x, x), x > 0))
        return True
    except Exception as exc:  # a missing compiler surfaces as a RuntimeError from MLX
        logger.warning("compiled CPU kernels unavailable, using MLX's exp (slower): %s", exc)
        return False


_lock = threading.Lock()
_probed: dict[str, bool] = {}


def available() -> bool:
    """Whether the kernels work in this process (probed once, on first use).

    Returns:
        True when MLX could compile and run them.
    """
    if "works" not in _probed:
        with _lock:
            if "works" not in _probed:
                _probed["works"] = probe()
    return _probed["works"]


def exp(x: mx.array, shift: mx.array | None = None) -> mx.array:
    """``e^(x - shift)`` elementwise.

    Args:
        x: Any shape.
        shift: Subtracted first (broadcast), inside the same kernels; e.g. a row maximum.

    Returns:
        ``x``'s shape and dtype.
    """
    if shift is None:
        return _fast_exp(x)
    return _exp_tail_c(*_shifted_parts(x, shift), x)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``, the SwiGLU activation, in one pass.

    Args:
        gate: Gate projection output.
        up: Up projection output (same shape, or broadcastable).

    Returns:
        The activation, in ``up``'s dtype.
    """
    return _fast_swiglu(gate, up)


def softmax(x: mx.array, axis: int = -1, keep: mx.array | None = None) -> mx.array:
    """Softmax along ``axis``, computed in float32, optionally over the ``keep`` entries only.

    Args:
        x: Scores.
        axis: The axis to normalise.
        keep: Boolean mask broadcastable to ``x``; False entries get probability 0. Every
            slice along ``axis`` must keep at least one entry.

    Returns:
        Probabilities in ``x``'s dtype.
    """
    x32 = x.astype(mx.float32)
    if keep is None:
        e = _exp_tail_c(*_shifted_parts(x32, mx.max(x32, axis=axis, keepdims=True)), x32)
    else:
        row_max = mx.max(mx.where(keep, x32, -mx.inf), axis=axis, keepdims=True)
        e = _masked_tail_c(*_shifted_parts(x32, row_max), keep)
    return (e / mx.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, bitwise ``mx.fast.rms_norm``.

    Args:
        x: ``[..., M]``.
        weight: ``[M]``.
        eps: Added to the mean square.

    Returns:
        ``x``'s shape, in the promoted dtype of ``x`` and ``weight`` (as MLX's).
    """
    x32 = x.astype(mx.float32)
    mean_square = mx.mean(mx.square(x32), axis=-1, keepdims=True)
    return _rms_tail_c(x, mean_square, weight, mx.array(eps, dtype=mx.float32))
