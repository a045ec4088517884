"""Pipeline mode: each rank runs its slice of the layers and hands the hidden states on.

One forward pass, for ranks 0..N-1 (``models.shard.PipelineShard`` decides the slices):

    rank 0:   embed -> layers[0:a]  -> send to 1   ... recv from N-1 -> norm -> head -> logits
    rank r:   recv from r-1 -> layers[..] -> send to r+1 (the last rank sends to 0)

Rank 0 holds the embedding and the head because it samples; the hand-offs are MLX's
``send`` / ``recv``. Each is evaluated at once: a step may hold several passes (prefill
chunks and the decode batch), and evaluating them lazily together could run one pass's
``recv`` before another's ``send`` on one rank and not on the next, crossing the streams.
Every rank runs the same passes in the same order because rank 0 broadcasts the step first
(``server.distributed.engine``).

Only rank 0's output is logits; another rank returns what it sent (the runner evaluates it
and discards it). It knows the stack of ``models.base`` (embedding, layers, norm, head); it
does not know the scheduler or sampling.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import backend
from moeserve.models.cache import CacheLayout, CacheStore, SequenceCache, StepCache
from moeserve.models.shard import PipelineShard
from moeserve.server.distributed.link import Link
from moeserve.server.distributed.rank_model import RankModel


class PipelineModel(RankModel):
    """A rank's slice of the model, with the model protocol of ``models.base``.

    Args:
        model: The model as the loader prepared it for ``shard``.
        shard: This rank's layers.
        link: The group.
        dtype: The activations' dtype on every rank (rank 0's embedding dtype).
        hidden_size: M, the width of what crosses between ranks.
    """

    def __init__(
        self, model: nn.Module, shard: PipelineShard, link: Link, dtype: mx.Dtype, hidden_size: int
    ) -> None:
        super().__init__(model, link)
        self._shard, self._dtype, self._hidden = shard, dtype, hidden_size

    def cache_dtype(self) -> mx.Dtype:
        """The activations' dtype (the same on every rank)."""
        return self._dtype

    def cache_layout(self, dtype: mx.Dtype | None = None) -> CacheLayout:
        """This rank's layers' kinds, costed (``CausalLM.cache_layout``)."""
        return CacheLayout(self.cache_kinds(), (dtype or self._dtype).size)

    def make_cache(self) -> SequenceCache:
        """A one-sequence cache over this rank's layers."""
        return SequenceCache(CacheStore(self.cache_layout(), self._dtype))

    def __call__(
        self,
        inputs: mx.array,
        cache: StepCache | SequenceCache | None = None,
        last_only: bool = False,
    ) -> mx.array:
        """One pass through every rank's slice.

        Args:
            inputs: Token ids ``[B, L]`` (every rank gets them from the step broadcast).
            cache: This rank's cache views.
            last_only: Logits for the last position only.

        Returns:
            Rank 0: logits ``[B, L or 1, V]``; other ranks: the hidden states they sent.
        """
        rank, size, group = self._link.rank, self._link.size, self._link.group
        B, L = inputs.shape
        if isinstance(cache, SequenceCache):
            cache = cache.begin(B, L)
        stack = self._lm.stack
        if rank == 0:
            h = stack.embedding(inputs)  # [B, L, M]
            if stack.embedding_scale is not None:
                h = h * stack.embedding_scale
        else:
            h = self._receive((B, L, self._hidden), rank - 1)
        h = self._layers(h, cache)
        sent = mx.distributed.send(h.astype(self._dtype), (rank + 1) % size, group=group)
        with self._link.collective(f"the hand-off to rank {(rank + 1) % size}"):
            mx.eval(sent)
        self._link.stats.activation_bytes += sent.nbytes
        if rank != 0:
            return sent
        h = stack[stack.names.norm](self._receive((B, L, self._hidden), size - 1))
        if last_only:
            h = h[:, -1:]
        return self._lm.logits(h)

    def _receive(self, shape: tuple[int, int, int], src: int) -> mx.array:
        h = mx.distributed.recv(shape, self._dtype, src, group=self._link.group)
        with self._link.collective(f"the hand-off from rank {src}"):
            mx.eval(h)
        self._link.stats.activation_bytes += h.nbytes
        return h

    def _layers(self, h: mx.array, cache: StepCache | None) -> mx.array:
        """This rank's layers, as ``DecoderStack`` runs them (one mask per view, one pass)."""
        layers = self.layers
        caches: Any = cache if cache is not None else [None] * len(layers)
        stateless = "causal" if h.shape[1] > 1 else None
        with backend.forward_pass():
            for layer, view in zip(layers, caches):
                h = layer(h, view.mask if view is not None else stateless, view)
        return h
