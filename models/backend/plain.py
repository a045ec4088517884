"""The plain backend: MLX's own operations, as they are.

This is what runs on Metal, where MLX's fused kernels (``mx.fast.*``, ``gather_mm`` /
``gather_qmm``) are already the fast path, and it is the reference every other backend is
tested against. It knows nothing about the CPU; ``models/backend/cpu.py`` overrides the
operations that MLX's CPU backend runs slowly.

Shape legend: B = batch, H = query heads, K = key/value heads, L = new tokens, S = keys,
D = head dim, T = tokens, A = experts per token, M = model dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.backend import experts
from moeserve.models.backend.paged import PagedKV
from moeserve.models.backend.rope import RopeSchedule


class Backend:
    """How the layers' plain operations run: here, as MLX's own ops."""

    name = "mlx"

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
        """Scaled dot-product attention with grouped-query heads.

        Args:
            q: Queries ``[B, H, L, D]``.
            k: Keys ``[B, K, S, D]`` (H % K == 0), or left in the cache's pool (``PagedKV``:
                gathered here; MLX's kernels read contiguous arrays).
            v: Values ``[B, K, S, D]`` (or ``PagedKV``, as ``k``).
            scale: Multiplier of the scores (usually ``D ** -0.5``).
            mask: None, ``"causal"`` (bottom-right aligned: query i sees keys
                ``<= S - L + i``), or a boolean array broadcastable to ``[B, H or 1, L, S]``
                (True = may attend).
            sinks: Optional ``[H]`` logits that join each softmax without a value (gpt-oss).

        Returns:
            ``[B, H, L, D]``.
        """
        if isinstance(k, PagedKV):
            k, v = k.gather(), v.gather()
        if sinks is not None:
            return mx.fast.scaled_dot_product_attention(
                q, k, v, scale=scale, mask=mask, sinks=sinks.astype(q.dtype)
            )
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def swiglu(self, gate: mx.array, up: mx.array) -> mx.array:
        """``silu(gate) * up``.

        Args:
            gate: Gate projection output.
            up: Up projection output.

        Returns:
            The activation, in ``up``'s dtype.
        """
        return nn.silu(gate) * up

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        """RMSNorm over the last axis.

        Args:
            x: ``[..., M]``.
            weight: ``[M]``.
            eps: Added to the mean square.

        Returns:
            ``x``'s shape.
        """
        return mx.fast.rms_norm(x, weight, eps)

    def rope(self, x: mx.array, offset: int | mx.array, schedule: RopeSchedule) -> mx.array:
        """Rotary embedding of ``x`` whose first token sits at ``offset``.

        Args:
            x: Queries or keys ``[B, H, L, D]``.
            offset: Position of the first token (int or per-row ``[B]``).
            schedule: The layer's frequency schedule.

        Returns:
            ``x`` rotated.
        """
        return schedule.apply(x, offset)

    def switch_glu(
        self,
        x: mx.array,
        inds: mx.array,
        gate: Any,
        up: Any,
        down: Any,
        activation: experts.Swiglu | None = None,
    ) -> mx.array:
        """Each token through its selected SwiGLU experts (``models/backend/experts.py``).

        Args:
            x: ``[T, M]``.
            inds: Expert ids ``[T, A]``.
            gate: Stacked gate projection (``SwitchLinear`` or quantized).
            up: Stacked up projection.
            down: Stacked down projection.
            activation: ``(gate, up) -> hidden`` for a family whose gated unit is not plain
                SwiGLU (gpt-oss's clamped one); None: ``self.swiglu``.

        Returns:
            Per-expert outputs ``[T, A, M]``.
        """
        return experts.gathered(x, inds, gate, up, down, activation or self.swiglu)

    @contextmanager
    def forward_pass(self) -> Iterator[None]:
        """Scope of one forward pass through the decoder stack (nothing to share here)."""
        yield

    def kernels(self) -> str:
        """Which kernels run, for the startup line."""
        return "GPU kernels"
