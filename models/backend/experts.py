"""The three ways routed experts can run, and which one the CPU backend picks for T tokens.

``SwitchGLU`` (``models/layers/moe.py``) asks the backend for ``switch_glu(x, inds, gate,
up, down)``: one SwiGLU expert per selected (token, expert) pair. The projections are
``SwitchLinear``-like modules: called as ``proj(x, inds, sorted_indices)`` they run
``mx.gather_mm`` / ``mx.gather_qmm``; ``weight`` ``[E, out, in]`` and an optional ``bias``
``[E, out]`` are their stacked parameters, and a quantized one has ``scales``.

* ``gathered``: ``gather_mm``; a few tokens touch only their A experts each. The only path on
  Metal and for quantized weights, where the gathered kernels are the right ones.
* ``dense``: every expert on every token as E batched matmuls, then keep the A selected
  outputs: E/A times the FLOPs but BLAS-efficient and free of host syncs.
* ``grouped`` (prefill chunks, big batches): group the (token, expert) pairs by expert and run
  one contiguous matmul per expert. It needs the per-expert counts on the host, one sync per
  layer, which pays for itself once each expert gets several rows.

``cpu_strategy`` holds the CPU's choice and the measurements behind it. Shape legend:
T = tokens, A = experts per token, E = experts, M = model dim, F = expert hidden dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

Swiglu = Callable[[mx.array, mx.array], mx.array]

# Sorting tokens by expert pays off once there are enough (token, expert) pairs for each
# expert's weights to be reused across several rows.
SORT_THRESHOLD = 64

# How routed experts run on the CPU backend, by number of tokens T. Measured with
# bench/moe_dispatch.py (2-core x86-64, OpenBLAS, 16 experts 512->256, top-4; ms per call;
# bench/RESULTS.md has the runs). MLX's CPU gather_mm is one 1-row matmul per (token, expert)
# pair, so its speed depends on how the BLAS runs 1-row products. With the gemv shim of
# models/backend/blas.py they stream each weight once and gather wins up to ~100 tokens
# (pairs are sorted by expert from T = 16 on, so consecutive products reuse one expert's
# weights from cache):
#      T    gather   dense   grouped
#      1      0.2     1.4      0.6
#      4      0.6     3.3      2.3
#     16      1.9     3.2      4.8
#     64      4.9    11.9      8.7
#     96      7.3    17.9      9.2
#    128     11.1    26.2     11.0
#    512     53.2    87.5     18.3
# Without the shim (another BLAS, no C compiler), 1-row products pack the whole weight first
# and gather only wins at a few tokens:
#      T    gather   dense   grouped
#      1      0.4     2.9      0.9
#      4      3.0     3.2      2.8
#     16      8.6     5.0      5.8
#     32     13.5     6.9      6.7
#    512    185.9    86.9     24.8
CPU_GEMV_GATHER_MAX_TOKENS = 96
CPU_GATHER_MAX_TOKENS = 4
CPU_DENSE_MAX_TOKENS = 24


def cpu_strategy(tokens: int, quantized: bool, dtype: mx.Dtype, gemv: bool) -> str:
    """Pick how routed experts run on the CPU for a batch of ``tokens`` tokens.

    Args:
        tokens: T.
        quantized: Whether the expert weights are quantized (always gathered).
        dtype: The activations' dtype. MLX's CPU ``gather_mm`` takes float32 only, so half
            precision never uses it.
        gemv: Whether one-row products go through the gemv shim.

    Returns:
        ``"gather"``, ``"dense"`` or ``"grouped"``.
    """
    if quantized:
        return "gather"
    if dtype == mx.float32:
        if gemv:
            return "gather" if tokens <= CPU_GEMV_GATHER_MAX_TOKENS else "grouped"
        if tokens <= CPU_GATHER_MAX_TOKENS:
            return "gather"
    return "dense" if tokens <= CPU_DENSE_MAX_TOKENS else "grouped"


def gathered(x: mx.array, inds: mx.array, gate: Any, up: Any, down: Any, swiglu: Swiglu):
    """Every selected pair through ``gather_mm`` / ``gather_qmm`` (the projections' call).

    Args:
        x: ``[T, M]``.
        inds: Expert ids ``[T, A]``.
        gate: Gate projection (``SwitchLinear`` or its quantized form).
        up: Up projection.
        down: Down projection.
        swiglu: The activation.

    Returns:
        ``[T, A, M]``.
    """

    def glu(xs: mx.array, ids: mx.array, sorted_indices: bool) -> mx.array:
        h = swiglu(gate(xs, ids, sorted_indices), up(xs, ids, sorted_indices))
        return down(h, ids, sorted_indices)

    T, A = inds.shape
    if inds.size >= SORT_THRESHOLD:
        # Visit (token, expert) pairs grouped by expert so each expert's weights are read once.
        flat = inds.flatten()  # [T*A]
        order = mx.argsort(flat)
        inv = mx.argsort(order)
        xs = x[order // A][:, None, None]  # [T*A, 1, 1, M]
        h = glu(xs, flat[order][:, None], sorted_indices=True)  # [T*A, 1, 1, M]
        return h.squeeze((1, 2))[inv].reshape(T, A, -1)
    return glu(x[:, None, None], inds, sorted_indices=False).squeeze(-2)  # [T, A, M]


def _all_experts(proj: Any, x: mx.array) -> mx.array:
    """Every expert of ``proj`` on ``x`` ``[T, in]`` or ``[E, T, in]``: ``[E, T, out]``."""
    y = x @ proj["weight"].swapaxes(-1, -2)
    return y + proj["bias"][:, None, :] if "bias" in proj else y


def _one_expert(proj: Any, x: mx.array, e: int) -> mx.array:
    """Expert ``e`` of ``proj`` on its rows ``x`` ``[N, in]``: ``[N, out]``."""
    y = x @ proj["weight"][e].T
    return y + proj["bias"][e] if "bias" in proj else y


def dense(x: mx.array, inds: mx.array, gate: Any, up: Any, down: Any, swiglu: Swiglu):
    """Every expert on every token, then the selected outputs (same arguments as ``gathered``).

    Returns:
        ``[T, A, M]``.
    """
    h = swiglu(_all_experts(gate, x), _all_experts(up, x))  # [E, T, F]
    out = _all_experts(down, h).swapaxes(0, 1)  # [T, E, M]
    return mx.take_along_axis(out, inds[..., None].astype(mx.int32), axis=1)  # [T, A, M]


def grouped(x: mx.array, inds: mx.array, gate: Any, up: Any, down: Any, swiglu: Swiglu):
    """One contiguous matmul per expert over its rows (same arguments as ``gathered``).

    Returns:
        ``[T, A, M]``.
    """
    T, A = inds.shape
    flat = inds.flatten()  # [T*A]
    order = mx.argsort(flat)  # pairs grouped by expert
    E = gate["weight"].shape[0]
    counts = mx.zeros((E,), mx.int32).at[flat].add(1).tolist()  # host sync (see the module)
    rows = x[order // A]  # [T*A, M], contiguous per expert
    outs, start = [], 0
    for e, count in enumerate(counts):
        if count:
            seg = rows[start : start + count]  # [N_e, M]
            h = swiglu(_one_expert(gate, seg, e), _one_expert(up, seg, e))  # [N_e, F]
            outs.append(_one_expert(down, h, e))  # [N_e, M]
            start += count
    return mx.concatenate(outs)[mx.argsort(order)].reshape(T, A, -1)


STRATEGIES = {"gather": gathered, "dense": dense, "grouped": grouped}
