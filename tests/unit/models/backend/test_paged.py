"""Attention over keys and values left in the block pool (``PagedKV``) equals the gathered copy.

The pool is filled with random values and rows own scattered, interleaved blocks, as they do
after rows have joined and left; rows differ in length (the mask hides each row's tail and its
padding blocks). The CPU backend's in-place path (``cpu_attention.paged_decode``) and the
plain backend (which gathers, then runs MLX's attention) are both checked against attention
written out by hand over a copy gathered with NumPy.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models import backend
from moeserve.models.backend import Backend, CpuBackend
from moeserve.models.backend.paged import PagedKV

BLOCK = 16


def _case(seed: int, rows: list[int], heads: int, kv_heads: int, d: int, e: int):
    """A pool of interleaved blocks, rows of the given lengths, a query per row, the mask."""
    rng = np.random.default_rng(seed)
    per_row = [-(-n // BLOCK) for n in rows]
    capacity = sum(per_row) + 3  # spare blocks hold junk that must never be read
    ids = rng.permutation(capacity)
    tables, at = [], 0
    for n in per_row:
        tables.append(ids[at : at + n])
        at += n
    width = max(per_row)
    blocks = np.array([list(t) + [t[0]] * (width - len(t)) for t in tables], dtype=np.int32)
    k_pool = rng.standard_normal((capacity * kv_heads * BLOCK, d)).astype(np.float32)
    v_pool = rng.standard_normal((capacity * kv_heads * BLOCK, e)).astype(np.float32)
    q = rng.standard_normal((len(rows), heads, 1, d)).astype(np.float32)
    keep = np.zeros((len(rows), 1, 1, width * BLOCK), dtype=bool)
    for b, n in enumerate(rows):
        keep[b, 0, 0, :n] = True
    return q, k_pool, v_pool, blocks, keep


def _by_hand(q, k_pool, v_pool, blocks, keep, kv_heads, scale):
    """Gather each row's keys with NumPy, then softmax(q k^T) v over the kept positions."""
    B, H, _, _ = q.shape
    G = H // kv_heads
    out = np.zeros((B, H, 1, v_pool.shape[1]), dtype=np.float64)
    for b in range(B):
        for h in range(H):
            kh = h // G
            rows = [(blk * kv_heads + kh) * BLOCK + o for blk in blocks[b] for o in range(BLOCK)]
            s = (k_pool[rows] @ q[b, h, 0]) * scale
            s = np.where(keep[b, 0, 0], s, -np.inf)
            p = np.exp(s - s.max())
            out[b, h, 0] = (p / p.sum()) @ v_pool[rows]
    return out


@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "d", "e"),
    [([5, 40, 16, 33], 8, 4, 64, 64), ([1], 4, 1, 32, 16), ([70, 2, 17], 6, 2, 16, 24)],
)
@pytest.mark.parametrize(
    "chosen", [CpuBackend(min_elements=1), CpuBackend(fast_math=False), Backend()]
)
def test_paged_attention_equals_attention_over_the_gathered_copy(
    rows, heads, kv_heads, d, e, chosen
) -> None:
    q, k_pool, v_pool, blocks, keep = _case(len(rows) + d, rows, heads, kv_heads, d, e)
    scale = d**-0.5
    paged_k = PagedKV(mx.array(k_pool), kv_heads, BLOCK, mx.array(blocks))
    paged_v = PagedKV(mx.array(v_pool), kv_heads, BLOCK, mx.array(blocks))
    with backend.use(chosen):
        got = backend.sdpa(mx.array(q), paged_k, paged_v, scale=scale, mask=mx.array(keep))
    want = _by_hand(q, k_pool, v_pool, blocks, keep, kv_heads, scale)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


def test_gather_lays_the_blocks_out_as_attention_reads_them() -> None:
    _, k_pool, _, blocks, _ = _case(3, [20, 7], 4, 2, 8, 8)
    got = np.array(PagedKV(mx.array(k_pool), 2, BLOCK, mx.array(blocks)).gather())
    assert got.shape == (2, 2, 2 * BLOCK, 8)
    for b in range(2):
        for h in range(2):
            for n, blk in enumerate(blocks[b]):
                start = (blk * 2 + h) * BLOCK
                want = k_pool[start : start + BLOCK]
                assert (got[b, h, n * BLOCK : (n + 1) * BLOCK] == want).all()
