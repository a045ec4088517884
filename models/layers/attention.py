"""Grouped-query self-attention, written once for every architecture.

Knows: separate or fused QKV projections, optional biases, DBRX's ``clip_qkv``, optional
per-head RMSNorm on queries and keys (GLM-4-MoE, Bailing), rotary embeddings from
``layers/rope.py``, and writing into any cache from ``models/cache.py``. Parameter names are
configurable so that every family keeps the names its MLX-layout checkpoints use.

Shape legend: B = batch, L = new tokens, S = cached + new tokens, H = query heads,
K = key/value heads, D = head dim, M = model (hidden) dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from models.layers import fastmath
from models.layers.norm import RMSNorm
from models.layers.rope import RoPE, RopeConfig


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
    names: AttentionNames = AttentionNames()


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
            setattr(self, n.q, nn.Linear(M, H * D, bias=cfg.qkv_bias))
            setattr(self, n.k, nn.Linear(M, K * D, bias=cfg.qkv_bias))
            setattr(self, n.v, nn.Linear(M, K * D, bias=cfg.qkv_bias))
        setattr(self, n.o, nn.Linear(H * D, M, bias=cfg.o_bias))
        if cfg.qk_norm_eps is not None:
            setattr(self, n.q_norm, RMSNorm(D, eps=cfg.qk_norm_eps))
            setattr(self, n.k_norm, RMSNorm(D, eps=cfg.qk_norm_eps))
        self.rope = RoPE(D, cfg.rope)

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
            mask: From ``models.base.attention_mask``.
            cache: This layer's KV cache, or ``None`` for a stateless pass.

        Returns:
            ``[B, L, M]``.
        """
        c, n = self.cfg, self.cfg.names
        B, L, _ = x.shape
        q, k, v = self._project(x)
        q = q.reshape(B, L, c.num_heads, c.head_dim)  # [B, L, H, D]
        k = k.reshape(B, L, c.num_kv_heads, c.head_dim)  # [B, L, K, D]
        v = v.reshape(B, L, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)  # [B, K, L, D]
        if c.qk_norm_eps is not None:  # per head, before rotation
            q, k = getattr(self, n.q_norm)(q), getattr(self, n.k_norm)(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)  # [B, H|K, L, D]
        offset = cache.rope_offset if cache is not None else 0
        key = cache.rope_key if cache is not None else 0
        q, k = self.rope(q, offset, key), self.rope(k, offset, key)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, K, S, D]
        out = attend(q, k, v, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # [B, L, H*D]
        return getattr(self, n.o)(out)


def attend(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask: mx.array | str | None
) -> mx.array:
    """Scaled dot-product attention with grouped-query heads.

    On the GPU this is ``mx.fast.scaled_dot_product_attention``. On the CPU that function is
    a composition of ops whose softmax spends most of its time in ``mx.exp``, so when the
    scores are large enough for ``fastmath.worthwhile`` they are computed here with its
    compiled exponential, in float32, with the G query heads that share a KV head stacked as
    the rows of one matmul:

    * one query per row (decode steps): ``Q K^T``, a softmax masked by the boolean mask
      (left padding), ``P V``;
    * a causal prefill chunk: ``_causal_blocks``, which never scores the keys a block of
      queries cannot see and keeps each block's scores in cache.

    Other masks with several queries (not used by moeserve's engine) go to MLX.

    Args:
        q: Queries ``[B, H, L, D]``.
        k: Keys ``[B, K, S, D]`` (H % K == 0).
        v: Values ``[B, K, S, D]``.
        scale: Multiplier of the scores (usually ``D ** -0.5``).
        mask: None, ``"causal"`` (bottom-right aligned: query i sees keys ``<= S - L + i``),
            or a boolean array broadcastable to ``[B, H or 1, L, S]`` (True = may attend).

    Returns:
        ``[B, H, L, D]``.
    """
    B, H, L, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if not fastmath.worthwhile(B * H * L * S):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if L > 1:
        if isinstance(mask, str) and mask == "causal":
            return _causal_blocks(q, k, v, scale)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if mask is not None and not isinstance(mask, str) and mask.dtype != mx.bool_:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    G = H // K
    qg = (q * scale).reshape(B, K, G, D)  # query head h = kv_head * G + g
    scores = qg @ k.swapaxes(-1, -2)  # [B, K, G, S]
    keep = None
    if isinstance(mask, mx.array):  # broadcastable to [B, H, 1, S]; "causal" is moot at L = 1
        keep = mask.reshape(mask.shape[0], -1, 1, S)  # [B, 1 or H, 1, S]
        if keep.shape[1] == H:
            keep = keep.reshape(mask.shape[0], K, G, S)
    probs = fastmath.softmax(scores, axis=-1, keep=keep).astype(v.dtype)
    return (probs @ v).reshape(B, H, 1, D)  # [B, K, G, D] -> [B, H, 1, D]


# Scores of one query block, all heads together: about 1 MB of float32, so that the block's
# passes (scores, max, exp, sum, P V) stay in a core's L2 cache. Measured on the bench
# model (8 heads, 512-token chunks): 2.2-3x MLX's attention at 512-1024 keys, 1.4-1.8x at 2,048.
_BLOCK_SCORES = 1 << 18


def _causal_blocks(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Bottom-right-aligned causal attention of L > 1 queries, a block of queries at a time.

    Each block of queries sees only the keys up to its last query, so the keys after the
    block are never scored. Within the block the causal mask is an additive 0 / -inf bias
    fused into the scores' matmul (``addmm``); the exponential is ``fastmath``'s; the
    normalisation divides the ``[rows, D]`` output rather than the ``[rows, S]`` weights.

    Args:
        q: ``[B, H, L, D]``.
        k: ``[B, K, S, D]``, S >= L.
        v: ``[B, K, S, D]``.
        scale: Score multiplier.

    Returns:
        ``[B, H, L, D]``.
    """
    B, H, L, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    rows = max(16, _BLOCK_SCORES // (B * H * S))
    block = min(L, 1 << (rows.bit_length() - 1))  # a power of two, for a few distinct shapes
    qg = (q * scale).reshape(B, K, G, L, D)
    outs = []
    for start in range(0, L, block):
        end = min(L, start + block)
        n, visible = end - start, S - L + end  # queries in the block, keys they may see
        qb = qg[:, :, :, start:end].reshape(B, K, G * n, D)
        positions = mx.arange(S - L + start, S - L + end)[:, None]  # [n, 1]
        bias = mx.where(positions >= mx.arange(visible)[None], 0.0, -mx.inf)  # [n, visible]
        bias = mx.broadcast_to(bias[None], (G, n, visible)).reshape(G * n, visible)
        scores = mx.addmm(bias, qb, k[:, :, :visible].swapaxes(-1, -2)).astype(mx.float32)
        weights = fastmath.exp(scores, shift=mx.max(scores, axis=-1, keepdims=True))
        total = mx.sum(weights, axis=-1, keepdims=True)  # [B, K, G*n, 1]
        out = (weights @ v[:, :, :visible].astype(mx.float32)) / total  # [B, K, G*n, D]
        outs.append(out.reshape(B, K, G, n, D))
    return mx.concatenate(outs, axis=3).reshape(B, H, L, D).astype(q.dtype)
