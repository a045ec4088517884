"""The CPU backend: MLX's Linux CPU ops, with moeserve's speed-ups where they pay.

What it changes, each bitwise MLX's result or within float32 rounding of it, and why:

* ``sdpa``, ``swiglu``: the exponential of attention's softmax and of SiLU runs through
  ``fastmath``'s compiled kernels (3-4x MLX's ``exp``) for arrays of ``min_elements`` and
  more; decode steps and causal prefill chunks have their own attention
  (``cpu_attention.py``); anything else goes to MLX.
* ``rms_norm``: the elementwise tail is one compiled kernel (bitwise MLX's, three ops
  instead of eight).
* ``rope``: one cos/sin table per forward pass and schedule, shared by every layer's
  queries and keys (``rope.py``; bitwise MLX's).
* ``switch_glu``: the routed experts run gathered, dense or grouped by the number of tokens
  (``experts.py``, with the timings behind the thresholds).

The compiled kernels need a C++ compiler at run time (``fastmath.available``); without one,
or with ``fast_math`` off (the ``cpu_fast_math = false`` setting), ``sdpa``, ``swiglu`` and
``rms_norm`` are MLX's own ops. This module does not decide whether the process runs on the
CPU: ``models.backend.current`` does.

Shape legend: B = batch, H = query heads, L = new tokens, S = keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from moeserve.models.backend import blas, cpu_attention, experts, fastmath
from moeserve.models.backend.paged import PagedKV
from moeserve.models.backend.plain import Backend
from moeserve.models.backend.rope import RopeSchedule, RopeTables

# Below this many elements MLX's own op is as fast: the compiled path runs three kernels where
# MLX runs one or two, and at this size dispatch, not arithmetic, is the cost (measured
# crossover 2-4k elements on the bench machine).
MIN_ELEMENTS = 4096


def _boolean(mask: Any) -> bool:
    """Whether ``mask`` is a boolean array (not a string, not an additive bias)."""
    return isinstance(mask, mx.array) and mask.dtype == mx.bool_


@dataclass
class CpuBackend(Backend):
    """MLX's CPU ops with the compiled kernels, RoPE tables and expert dispatch above."""

    fast_math: bool = True  # use fastmath's compiled kernels when they work here
    min_elements: int = MIN_ELEMENTS  # smallest array the compiled exp / softmax / SiLU take
    gemv: bool | None = None  # one-row products at sgemv speed; None: ask blas (the shim)
    block_scores: int = cpu_attention.BLOCK_SCORES  # scores per causal-attention block
    name = "cpu"

    def __post_init__(self) -> None:
        self._tables: RopeTables | None = None  # the current forward pass's RoPE tables

    def fast_math_active(self) -> bool:
        """Whether the compiled kernels are in use: wanted and working.

        Returns:
            True when ``sdpa``, ``swiglu`` and ``rms_norm`` may take the compiled path.
        """
        return self.fast_math and fastmath.available()

    def _worthwhile(self, size: int) -> bool:
        return size >= self.min_elements and self.fast_math_active()

    def _exp(self, x: mx.array, shift: mx.array) -> mx.array:
        """``e^(x - shift)``, compiled when ``x`` is large enough."""
        return fastmath.exp(x, shift) if self._worthwhile(x.size) else mx.exp(x - shift)

    def sdpa(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        *,
        scale: float,
        mask: mx.array | str | None,
        sinks: mx.array | None = None,
    ) -> mx.array:
        """Same contract as ``Backend.sdpa``; decode steps and causal chunks are done here."""
        B, H, L, _ = q.shape
        if isinstance(k, PagedKV):
            # Decode over the pool in place; anything else (sinks, several queries, an
            # additive mask) reads a gathered copy, as the plain backend does.
            if sinks is None and L == 1 and (mask is None or _boolean(mask)):
                fast = self._worthwhile(B * H * k.shape[2])
                return cpu_attention.paged_decode(q, k, v, scale=scale, mask=mask, fast=fast)
            k, v = k.gather(), v.gather()
        if sinks is None and self._worthwhile(B * H * L * k.shape[2]):
            if L > 1 and isinstance(mask, str) and mask == "causal":
                return cpu_attention.causal_blocks(
                    q, k, v, scale=scale, exp=self._exp, block_scores=self.block_scores
                )
            # Other masks with several queries (not used by moeserve's engine), and additive
            # masks, go to MLX.
            if L == 1 and (not isinstance(mask, mx.array) or _boolean(mask)):
                return cpu_attention.decode(q, k, v, scale=scale, mask=mask)
        return super().sdpa(q, k, v, scale=scale, mask=mask, sinks=sinks)

    def swiglu(self, gate: mx.array, up: mx.array) -> mx.array:
        """Same contract as ``Backend.swiglu``."""
        return (
            fastmath.swiglu(gate, up) if self._worthwhile(gate.size) else super().swiglu(gate, up)
        )

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        """Same contract as ``Backend.rms_norm``."""
        if not self.fast_math_active():
            return super().rms_norm(x, weight, eps)
        return fastmath.rms_norm(x, weight, eps)

    def rope(self, x: mx.array, offset: int | mx.array, schedule: RopeSchedule) -> mx.array:
        """Same contract as ``Backend.rope``; inside a forward pass, through its tables."""
        if self._tables is None:  # a lone call (tests, benchmarks): nothing to share
            return schedule.apply(x, offset)
        return self._tables.rotate(x, offset, schedule)

    def switch_glu(
        self,
        x: mx.array,
        inds: mx.array,
        gate: Any,
        up: Any,
        down: Any,
        activation: experts.Swiglu | None = None,
    ) -> mx.array:
        """Same contract as ``Backend.switch_glu``; the strategy follows ``expert_strategy``."""
        strategy = self.expert_strategy(x.shape[0], "scales" in gate, x.dtype)
        swiglu = activation or self.swiglu
        return experts.STRATEGIES[strategy](x, inds, gate, up, down, swiglu)

    def expert_strategy(self, tokens: int, quantized: bool, dtype: mx.Dtype) -> str:
        """How routed experts run for ``tokens`` tokens (``experts.cpu_strategy``).

        Args:
            tokens: T.
            quantized: Whether the expert weights are quantized.
            dtype: The activations' dtype.

        Returns:
            ``"gather"``, ``"dense"`` or ``"grouped"``.
        """
        gemv = blas.gemv_forwarding() if self.gemv is None else self.gemv
        return experts.cpu_strategy(tokens, quantized, dtype, gemv)

    @contextmanager
    def forward_pass(self) -> Iterator[None]:
        """Share RoPE tables between the layers of one forward pass (see ``rope.py``)."""
        outer, self._tables = self._tables, RopeTables()
        try:
            yield
        finally:
            self._tables = outer

    def kernels(self) -> str:
        """Which kernels run, for the startup line."""
        return "compiled CPU math" if self.fast_math_active() else "MLX CPU math"
