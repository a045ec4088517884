"""Grouped-query self-attention, written once for every architecture.

Knows: separate or fused QKV projections, optional biases, DBRX's ``clip_qkv``, optional
per-head RMSNorm on queries and keys (GLM-4-MoE, Bailing), Qwen3-Next's sigmoid output gate
(``output_gate``), rotary embeddings from
``layers/rope.py``, and writing into any cache from ``models/cache.py``. Parameter names are
configurable so that every family keeps the names its MLX-layout checkpoints use. The
attention itself is ``models.backend.sdpa``: how it runs on this device is not known here.

Shape legend: B = batch, L = new tokens, S = cached + new tokens, H = query heads,
K = key/value heads, D = head dim, M = model (hidden) dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import backend
from moeserve.models.cache import CacheKind, Full, Sliding
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.layers.rope import RoPE, RopeConfig


@dataclass(frozen=True)
class AttentionNames:
    """Checkpoint names of the attention sub-modules (MLX layout)."""

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str | None = None  # set for a fused projection (Bailing "query_key_value", DBRX "Wqkv")
    o: str = "o_proj"
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"


@dataclass(frozen=True)
class AttentionConfig:
    """Everything that varies in attention between our families."""

    hidden_size: int  # M
    num_heads: int  # H
    num_kv_heads: int  # K; H % K == 0 (grouped-query attention)
    head_dim: int  # D
    rope: RopeConfig
    qkv_bias: bool = False  # biases on the q/k/v (or fused) projection
    o_bias: bool = False  # bias on the output projection
    qk_norm_eps: float | None = None  # RMSNorm q and k per head when set
    clip_qkv: float | None = None  # DBRX: clamp projected q/k/v to [-c, c] (training stabiliser)
    scale: float | None = None  # softmax scale; default 1/sqrt(D) (Granite sets its own)
    sliding_window: int | None = None  # attend to the last N positions only (gpt-oss, Gemma)
    sinks: bool = False  # a learned per-head logit in every softmax's denominator (gpt-oss)
    # Qwen3-Next: q_proj emits, per head, D query channels then D gate channels, and the
    # attention output is multiplied by sigmoid(gate) before o_proj (separate q only).
    output_gate: bool = False
    names: AttentionNames = AttentionNames()


def gqa_config(args: Any, **options: Any) -> AttentionConfig:
    """The attention of a config that uses the usual names for its shape.

    Args:
        args: A ``ModelArgs`` with ``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``head_dim`` and ``rope``.
        **options: The other ``AttentionConfig`` fields (biases, qk-norm, scale, names).

    Returns:
        The attention configuration.
    """
    return AttentionConfig(
        hidden_size=args.hidden_size,
        num_heads=args.num_attention_heads,
        num_kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        rope=args.rope,
        **options,
    )


class Attention(nn.Module):
    """Causal GQA self-attention over a KV cache."""

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.names
        M, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.scale if cfg.scale is not None else D**-0.5
        if n.qkv:
            setattr(self, n.qkv, nn.Linear(M, (H + 2 * K) * D, bias=cfg.qkv_bias))
        else:
            q_width = 2 * H * D if cfg.output_gate else H * D
            setattr(self, n.q, nn.Linear(M, q_width, bias=cfg.qkv_bias))
            setattr(self, n.k, nn.Linear(M, K * D, bias=cfg.qkv_bias))
            setattr(self, n.v, nn.Linear(M, K * D, bias=cfg.qkv_bias))
        setattr(self, n.o, nn.Linear(H * D, M, bias=cfg.o_bias))
        if cfg.qk_norm_eps is not None:
            setattr(self, n.q_norm, RMSNorm(D, eps=cfg.qk_norm_eps))
            setattr(self, n.k_norm, RMSNorm(D, eps=cfg.qk_norm_eps))
        self.rope = RoPE(D, cfg.rope)
        if cfg.sinks:
            # One logit per head that competes in the softmax without contributing a value:
            # a head may attend to "nothing" (gpt-oss; arXiv:2309.17453 keeps real tokens).
            self.sinks = mx.zeros((H,))

    def cache_kind(self) -> CacheKind:
        """What this layer keeps per position: every key and value, or the last window's.

        Returns:
            ``Full`` or ``Sliding``.
        """
        c = self.cfg
        if c.sliding_window is not None:
            return Sliding(c.num_kv_heads, c.head_dim, sliding_window=c.sliding_window)
        return Full(c.num_kv_heads, c.head_dim)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries ``[B, L, H*D]``, keys and values ``[B, L, K*D]``."""
        n, c = self.cfg.names, self.cfg
        if n.qkv:
            qkv = getattr(self, n.qkv)(x)  # [B, L, (H + 2K) * D]
            if c.clip_qkv is not None:
                qkv = mx.clip(qkv, -c.clip_qkv, c.clip_qkv)
            q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            return tuple(mx.split(qkv, [q_size, q_size + kv_size], axis=-1))
        q, k, v = getattr(self, n.q)(x), getattr(self, n.k)(x), getattr(self, n.v)(x)
        if c.clip_qkv is not None:
            q, k, v = (mx.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        return q, k, v

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Any | None) -> mx.array:
        """Attend from ``x`` ``[B, L, M]`` to the cache plus ``x`` itself.

        Args:
            x: Normalised hidden states.
            mask: The cache view's mask (or ``"causal"``/None for a stateless pass).
            cache: This layer's cache view (``models.cache.LayerView``), or ``None``.

        Returns:
            ``[B, L, M]``.
        """
        c, n = self.cfg, self.cfg.names
        B, L, _ = x.shape
        q, k, v = self._project(x)
        gate = None
        if c.output_gate:  # [B, L, H, 2D] -> query [B, L, H, D] and gate [B, L, H*D]
            q, gate = mx.split(q.reshape(B, L, c.num_heads, 2 * c.head_dim), 2, axis=-1)
            gate = gate.reshape(B, L, -1)
        q = q.reshape(B, L, c.num_heads, c.head_dim)  # [B, L, H, D]
        k = k.reshape(B, L, c.num_kv_heads, c.head_dim)  # [B, L, K, D]
        v = v.reshape(B, L, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)  # [B, K, L, D]
        if c.qk_norm_eps is not None:  # per head, before rotation
            q, k = getattr(self, n.q_norm)(q), getattr(self, n.k_norm)(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)  # [B, H|K, L, D]
        offset = cache.rope_offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_page(k, v)  # [B, K, S, D], maybe left in the pool
        if cache is None and c.sliding_window is not None and L > 1:
            mask = _window_mask(L, c.sliding_window)
        sinks = self.sinks if c.sinks else None
        out = backend.sdpa(q, k, v, scale=self.scale, mask=mask, sinks=sinks)  # [B, H, L, D]
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # [B, L, H*D]
        if gate is not None:
            out = out * mx.sigmoid(gate)
        return getattr(self, n.o)(out)


def _window_mask(length: int, window: int) -> mx.array:
    """Causal and within ``window``, for a stateless pass: boolean ``[L, L]``."""
    pos = mx.arange(length)
    diff = pos[:, None] - pos[None]
    return (diff >= 0) & (diff < window)
