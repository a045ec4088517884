"""Scaled dot-product attention on the CPU, with the compiled exponential of ``fastmath``.

On the CPU ``mx.fast.scaled_dot_product_attention`` is a composition of ops whose softmax
spends most of its time in ``mx.exp``. The two shapes moeserve's engine runs most are done
here instead, in float32, with the G query heads that share a KV head stacked as the rows of
one matmul:

* ``decode``: one query per row (decode steps): ``Q K^T``, a softmax masked by the boolean
  mask (left padding), ``P V``;
* ``causal_blocks``: a causal prefill chunk, which never scores the keys a block of queries
  cannot see and keeps each block's scores in cache;
* ``paged_decode``: ``decode`` over keys and values left in the cache's block pool
  (``paged.PagedKV``), one small product per block and head (``mx.gather_mm``), so the
  cache is read where it lies instead of gathered into a copy first.

This module knows the arithmetic only; when it is worth using (device, setting, sizes, mask
kinds) is the CPU backend's decision (``models/backend/cpu.py``).

Shape legend: B = batch, H = query heads, K = key/value heads, G = H / K, L = queries,
S = keys, D = head dim (of queries and keys), E = value head dim (MLA's differs from D).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from moeserve.models.backend import fastmath
from moeserve.models.backend.paged import PagedKV

# Scores of one query block, all heads together: about 1 MB of float32, so that the block's
# passes (scores, max, exp, sum, P V) stay in a core's L2 cache. Measured on the bench
# model (8 heads, 512-token chunks): 2.2-3x MLX's attention at 512-1024 keys, 1.4-1.8x at 2,048.
BLOCK_SCORES = 1 << 18


def decode(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask: mx.array | str | None
) -> mx.array:
    """Attention of one query per row, with ``fastmath``'s softmax.

    Args:
        q: Queries ``[B, H, 1, D]``.
        k: Keys ``[B, K, S, D]`` (H % K == 0).
        v: Values ``[B, K, S, D]``.
        scale: Multiplier of the scores.
        mask: None, ``"causal"`` (moot for one query), or a boolean array broadcastable to
            ``[B, H, 1, S]`` (True = may attend).

    Returns:
        ``[B, H, 1, D]``.
    """
    B, H, _, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    qg = (q * scale).reshape(B, K, G, D)  # query head h = kv_head * G + g
    scores = qg @ k.swapaxes(-1, -2)  # [B, K, G, S]
    keep = None
    if isinstance(mask, mx.array):  # broadcastable to [B, H, 1, S]; "causal" is moot at L = 1
        keep = mask.reshape(mask.shape[0], -1, 1, S)  # [B, 1 or H, 1, S]
        if keep.shape[1] == H:
            keep = keep.reshape(mask.shape[0], K, G, S)
    probs = fastmath.softmax(scores, axis=-1, keep=keep).astype(v.dtype)
    return (probs @ v).reshape(B, H, 1, v.shape[-1])  # [B, K, G, E] -> [B, H, 1, E]


def paged_decode(
    q: mx.array, k: PagedKV, v: PagedKV, *, scale: float, mask: mx.array | None, fast: bool
) -> mx.array:
    """``decode`` with the keys and values read in place from the block pool.

    Each row's scores are one ``[G, D] x [D, block]`` product per block and KV head, taken
    straight from the pool by ``mx.gather_mm``; the softmax runs over the row's blocks laid
    side by side (``[B, K, G, N × block]``, small: no D); the values are one
    ``[G, block] x [block, E]`` product per block, summed over the blocks. Nothing of size
    ``S × D`` is copied.

    Args:
        q: Queries ``[B, H, 1, D]``.
        k: Keys in the pool (``K`` heads, ``N`` blocks per row).
        v: Values in the pool, with the same blocks.
        scale: Multiplier of the scores.
        mask: None, or a boolean array broadcastable to ``[B, H, 1, N × block]``.
        fast: Whether the softmax runs through ``fastmath`` (else MLX's own ops).

    Returns:
        ``[B, H, 1, E]``.
    """
    B, H, _, D = q.shape
    _, K, S, _ = k.shape
    G, N, block = H // K, k.blocks.shape[1], k.block
    pages = k.pages()  # [B, K, N]
    rows, each = _query_indices(B, K, N)
    qg = (q * scale).reshape(B * K, G, D)
    scores = mx.gather_mm(qg, k.matrices().swapaxes(-1, -2), rows, pages)  # [B, K, N, G, blk]
    scores = scores.transpose(0, 1, 3, 2, 4).reshape(B, K, G, S)
    keep = None
    if mask is not None:
        keep = mask.reshape(mask.shape[0], -1, 1, S)  # [B, 1 or H, 1, S]
        if keep.shape[1] == H:
            keep = keep.reshape(mask.shape[0], K, G, S)
    if fast:
        probs = fastmath.softmax(scores, axis=-1, keep=keep)
    else:
        masked = scores if keep is None else mx.where(keep, scores, -mx.inf)
        probs = mx.softmax(masked.astype(mx.float32), axis=-1)
    probs = probs.astype(v.dtype).reshape(B, K, G, N, block)
    probs = probs.transpose(0, 1, 3, 2, 4)  # [B, K, N, G, block]
    out = mx.gather_mm(probs.reshape(-1, G, block), v.matrices(), each, pages)  # [B,K,N,G,E]
    return out.sum(axis=2).reshape(B, H, 1, -1)


@functools.lru_cache(maxsize=256)
def _query_indices(B: int, K: int, N: int) -> tuple[mx.array, mx.array]:
    """``paged_decode``'s left-hand indices, uint32 ``[B, K, N]``: query group, and (group, block).

    Made from NumPy (no graph operations) and kept by shape: every layer of every decode
    step at this batch and length needs the same two arrays.
    """
    groups = np.broadcast_to(np.arange(B * K, dtype=np.uint32).reshape(B, K, 1), (B, K, N))
    each = np.arange(B * K * N, dtype=np.uint32).reshape(B, K, N)
    return mx.array(np.ascontiguousarray(groups)), mx.array(each)


def causal_blocks(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    exp: Callable[[mx.array, mx.array], mx.array],
    block_scores: int = BLOCK_SCORES,
) -> mx.array:
    """Bottom-right-aligned causal attention of L > 1 queries, a block of queries at a time.

    Each block of queries sees only the keys up to its last query, so the keys after the
    block are never scored. Within the block the causal mask is an additive 0 / -inf bias
    fused into the scores' matmul (``addmm``); the normalisation divides the ``[rows, D]``
    output rather than the ``[rows, S]`` weights.

    Args:
        q: ``[B, H, L, D]``.
        k: ``[B, K, S, D]``, S >= L.
        v: ``[B, K, S, D]``.
        scale: Score multiplier.
        exp: ``exp(scores, shift)``, i.e. ``e^(scores - shift)``: the backend's choice,
            which may differ from block to block by size.
        block_scores: Scores per block, all heads together (sets the block's rows).

    Returns:
        ``[B, H, L, D]``.
    """
    B, H, L, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    rows = max(16, block_scores // (B * H * S))
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
        weights = exp(scores, mx.max(scores, axis=-1, keepdims=True))
        total = mx.sum(weights, axis=-1, keepdims=True)  # [B, K, G*n, 1]
        out = (weights @ v[:, :, :visible].astype(mx.float32)) / total  # [B, K, G*n, D]
        outs.append(out.reshape(B, K, G, n, v.shape[-1]))
    return mx.concatenate(outs, axis=3).reshape(B, H, L, v.shape[-1]).astype(q.dtype)
