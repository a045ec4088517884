"""The pre-norm decoder layer of Qwen2-MoE, GLM-4-MoE, Bailing and GraniteMoE.

``h = x + attention(norm(x))``, then ``h + ffn(norm(h))``; the feed-forward block (dense or
MoE) sees the tokens flattened to ``[T, M]``, the shape the MoE routers work on. Granite
scales both branches by ``residual_multiplier`` before the add. What differs between the
families (their attention, their feed-forward block, their checkpoint names) is passed in;
DBRX, whose block boundaries differ, has its own layer.

Shape legend: B = batch, L = new tokens, T = B*L tokens, M = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.layers.norm import RMSNorm


@dataclass(frozen=True)
class LayerNames:
    """Checkpoint names of a decoder layer's sub-modules (MLX layout)."""

    attention: str = "self_attn"  # Bailing: "attention"
    ffn: str = "mlp"  # Granite: "block_sparse_moe"
    attention_norm: str = "input_layernorm"
    ffn_norm: str = "post_attention_layernorm"


class PreNormDecoderLayer(nn.Module):
    """One pre-norm block: attention, then the feed-forward block, each on an RMSNorm'd input.

    Args:
        attention: Called as ``attention(x, mask, cache)`` on ``[B, L, M]``.
        ffn: The feed-forward block, called on ``[T, M]``.
        hidden_size: M.
        eps: Epsilon of both RMSNorms.
        names: Checkpoint names of the four sub-modules.
        residual_scale: Multiplier of both branches before the add (Granite's
            ``residual_multiplier``); None for none.
    """

    def __init__(
        self,
        attention: nn.Module,
        ffn: nn.Module,
        hidden_size: int,
        eps: float,
        names: LayerNames = LayerNames(),
        residual_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.names = names
        self.residual_scale = residual_scale
        setattr(self, names.attention, attention)
        setattr(self, names.ffn, ffn)
        setattr(self, names.attention_norm, RMSNorm(hidden_size, eps=eps))
        setattr(self, names.ffn_norm, RMSNorm(hidden_size, eps=eps))

    def _scaled(self, branch: mx.array) -> mx.array:
        return branch if self.residual_scale is None else branch * self.residual_scale

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Any | None) -> mx.array:
        """Run the layer.

        Args:
            x: Hidden states ``[B, L, M]``.
            mask: The cache view's mask (see ``models.cache.views``).
            cache: This layer's KV cache, or None.

        Returns:
            ``[B, L, M]``.
        """
        n = self.names
        B, L, M = x.shape
        h = x + self._scaled(self[n.attention](self[n.attention_norm](x), mask, cache))
        ffn_in = self[n.ffn_norm](h).reshape(B * L, M)  # [T, M]
        return h + self._scaled(self[n.ffn](ffn_in).reshape(B, L, M))
