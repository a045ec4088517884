"""Keys or values that stay in the cache's block pool: what a paged attention reads.

A decode step's attention needs each row's keys and values. Gathering them out of the
block pool into a fresh ``[B, K, S, D]`` array copies every cached position of every row,
every layer, every step (about 79 MB per batch-16 step on the bench model; bench/RESULTS.md
section 13). ``PagedKV`` hands attention the pool itself instead, with each row's block
table, so a backend that can multiply blocks in place (``cpu_attention.paged_decode``,
with ``mx.gather_mm``) never copies them, and any other backend calls ``gather`` and gets
the same ``[B, K, S, D]`` array the copy would have made.

The pool is stored head-major per block (``models.cache.pool``): the rows of the 2-D array
run block, head, position in block, so ``pool.reshape(-1, block, D)[b * K + k]`` is head k
of block b, one contiguous ``[block, D]`` matrix.

Knows that layout and the index arithmetic; not rows, lengths or masks (the cache views
make the mask, over exactly the positions ``gather`` returns).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


def page_table(blocks: np.ndarray, heads: int) -> mx.array:
    """Indices into ``pool.reshape(-1, block, D)`` of each row's heads' blocks.

    Computed on the host: a decode pass's views make it once for all the layers of a group.

    Args:
        blocks: ``[B, N]`` each row's block ids.
        heads: K.

    Returns:
        uint32 ``[B, K, N]``: block ``blocks[b, n]``, head k.
    """
    per_head = np.arange(heads, dtype=np.int64)[None, :, None]
    return mx.array((blocks[:, None, :].astype(np.int64) * heads + per_head).astype(np.uint32))


@dataclass(frozen=True)
class PagedKV:
    """One layer's keys (or values) for a pass, left in the pool.

    Attributes:
        pool: The stored array ``[capacity * K * block, D]``.
        heads: K.
        block: Positions per block.
        blocks: int32 ``[B, N]``: each row's blocks in position order, padded with any block
            of the row's own (the mask hides the padding).
        page_table: ``pages()`` made beforehand (``page_table``), or None to make it here.
            A decode pass's views make it once for all the layers of a group.
    """

    pool: mx.array
    heads: int
    block: int
    blocks: mx.array
    page_table: mx.array | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``[B, K, S, D]`` of the gathered array, S = N × block."""
        B, N = self.blocks.shape
        return (B, self.heads, N * self.block, self.pool.shape[-1])

    @property
    def dtype(self) -> mx.Dtype:
        """Element type."""
        return self.pool.dtype

    def pages(self) -> mx.array:
        """Indices into ``pool.reshape(-1, block, D)`` of each row's heads' blocks.

        Returns:
            uint32 ``[B, K, N]``: block ``blocks[b, n]``, head k.
        """
        if self.page_table is not None:
            return self.page_table
        return page_table(np.array(self.blocks), self.heads)

    def matrices(self) -> mx.array:
        """The pool as ``[capacity * K, block, D]`` (a reshape: no copy)."""
        return self.pool.reshape(-1, self.block, self.pool.shape[-1])

    def gather(self) -> mx.array:
        """The positions as one contiguous ``[B, K, S, D]`` array (a copy).

        Returns:
            Each row's blocks in order, heads leading: what attention would read.
        """
        B, K, S, D = self.shape
        per_row = self.matrices()[self.pages()]  # [B, K, N, block, D]
        return per_row.reshape(B, K, S, D)
