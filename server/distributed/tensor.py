"""Tensor mode: every rank runs every layer on its heads, MLP columns and experts.

``models.shard.TensorShard`` decided what each rank holds; ``TensorModel`` adds the
communication after loading (quantization has replaced the linears by then): the modules in
``TensorShard.summed`` (each split attention's output projection, each split feed-forward
block) return the ``all_sum`` of their ranks' partial outputs, and each split ``SwitchGLU``
runs only the experts this rank holds, giving zero for the token slots routed elsewhere.
Both are done by giving the module instance a subclass whose ``__call__`` wraps the
original, so parameter names, quantization and the family's own code stay as they are.

Every rank computes the same logits; rank 0 samples. Each forward pass is evaluated up to
its final hidden states at once, so that every rank issues its collectives in the same
order even when a step holds several passes (see ``pipeline`` for the same reason).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.cache import CacheLayout, SequenceCache
from moeserve.models.shard import TensorShard
from moeserve.server.distributed.link import Link
from moeserve.server.distributed.rank_model import RankModel


def _summing(module: nn.Module, link: Link) -> None:
    """Make ``module`` return the sum over ranks of its output (counted in ``link.stats``)."""
    base = type(module)

    def call(self: nn.Module, *args: Any, **kwargs: Any) -> mx.array:
        partial = base.__call__(self, *args, **kwargs)
        link.stats.activation_bytes += partial.nbytes
        return mx.distributed.all_sum(partial, group=link.group)

    module.__class__ = type(f"Summed{base.__name__}", (base,), {"__call__": call})


def _local_experts(module: nn.Module, first: int, count: int) -> None:
    """Make a ``SwitchGLU`` holding experts ``[first, first + count)`` serve global indices."""
    base = type(module)

    def call(self: nn.Module, x: mx.array, inds: mx.array) -> mx.array:
        local = inds - first  # [T, A]
        held = (local >= 0) & (local < count)
        out = base.__call__(self, x, mx.where(held, local, 0))  # [T, A, M]
        return out * held[..., None].astype(out.dtype)

    module.__class__ = type(f"Local{base.__name__}", (base,), {"__call__": call})


class TensorModel(RankModel):
    """A rank's tensor-parallel part, with the model protocol of ``models.base``.

    Args:
        model: The loaded model, as ``shard`` prepared it.
        shard: The splits (``models.shard.TensorShard``).
        link: The group.
    """

    def __init__(self, model: nn.Module, shard: TensorShard, link: Link) -> None:
        super().__init__(model, link)
        modules = dict(model.named_modules())
        for path, (first, count) in shard.experts.items():
            _local_experts(modules[path], first, count)
        for path in shard.summed:
            _summing(modules[path], link)

    def cache_dtype(self) -> mx.Dtype:
        """The cache's element type."""
        return self._lm.cache_dtype()

    def cache_layout(self, dtype: mx.Dtype | None = None) -> CacheLayout:
        """This rank's kinds, costed."""
        return self._lm.cache_layout(dtype)

    def make_cache(self) -> SequenceCache:
        """A one-sequence cache of this rank's part."""
        return self._lm.make_cache()

    def __call__(self, inputs: mx.array, cache: Any = None, last_only: bool = False) -> mx.array:
        """Logits ``[B, L or 1, V]``, the same on every rank.

        Args:
            inputs: Token ids ``[B, L]``.
            cache: This rank's cache views.
            last_only: The last position's logits only.

        Returns:
            The logits (lazy; the collectives already ran).
        """
        h = self._lm.stack(inputs, cache)  # [B, L, M]
        with self._link.collective("a tensor-parallel pass"):
            mx.eval(h)
        if last_only:
            h = h[:, -1:]
        return self._lm.logits(h)
