"""The dense gated MLP (SwiGLU): dense layers and shared experts of every family.

Knows only ``down(silu(gate(x)) * up(x))`` and its parameter names; the activation is
``models.backend.swiglu``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import backend


class GatedMLP(nn.Module):
    """SwiGLU feed-forward block with the MLX-layout names ``gate_proj/up_proj/down_proj``.

    Shapes: ``[..., M] -> [..., M]`` through a hidden width ``F``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        """Apply the block.

        Args:
            x: ``[..., M]``.

        Returns:
            ``[..., M]``.
        """
        return self.down_proj(backend.swiglu(self.gate_proj(x), self.up_proj(x)))
