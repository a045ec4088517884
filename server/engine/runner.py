"""Executes a ``StepPlan`` on the model: chunked prefill, batched decode, sampling.

The runner owns every KV cache of running sequences. A sequence being prefilled has its own
per-layer ``KVCache``; when its prompt is done it joins the decode batch, one set of
left-padded ``BatchKVCache`` shared by all decoding rows. Sequences join and leave the batch
between steps without recomputing anyone else.

It knows token ids, logits and caches; it does not know text, stop strings, HTTP or policy
(the scheduler decides who runs). Its only host synchronisation per step is the sampler's
``to_lists``: the model's work for prefill chunks, decode rows and sampling is one graph.
Each ``Sequence`` is its own sampler row (parameters, histories, banned ids). When some rows
follow a grammar (``Sequence.matcher``), the graph is started first and their allowed-token
mask (``server.engine.grammar.allowed_mask``) is computed on the CPU meanwhile; the output
processor advances the matchers with the sampled tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import mlx.core as mx

from moeserve.models.base import LanguageModel
from moeserve.models.cache import BatchKVCache, KVCache
from moeserve.server.engine.grammar import allowed_mask
from moeserve.server.engine.sampling import Sampler, TokenSample
from moeserve.server.engine.scheduler import StepPlan
from moeserve.server.engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one step produced, as plain Python."""

    samples: dict[str, TokenSample] = field(default_factory=dict)  # seq_id -> sampled token

    def tokens(self) -> dict[str, int]:
        """The sampled token ids by ``seq_id`` (what ``Scheduler.update`` takes).

        Returns:
            ``{seq_id: token}``.
        """
        return {seq_id: sample.token for seq_id, sample in self.samples.items()}


class Runner:
    """Runs the model for the scheduler's plans.

    Args:
        model: Any model of the model protocol.
        sampler: The batched sampler.
    """

    def __init__(self, model: LanguageModel, sampler: Sampler | None = None) -> None:
        self.model = model
        self.sampler = sampler or Sampler()
        self._prefill: dict[str, list[KVCache]] = {}  # seq_id -> per-layer cache
        self._rows: list[str] = []  # decode batch row order (seq ids)
        self._batch: list[BatchKVCache] | None = None  # per-layer batched cache
        self.max_batch_seen = 0  # largest decode batch so far (tests and stats)

    @property
    def num_decoding(self) -> int:
        """Rows in the decode batch."""
        return len(self._rows)

    def adopt_prefix(self, seq: Sequence, cache: list[KVCache]) -> None:
        """Start ``seq``'s prefill from a reused prompt-cache prefix.

        Args:
            seq: A sequence whose ``num_computed`` equals the prefix length.
            cache: Per-layer caches holding exactly that prefix (owned by the runner now).
        """
        self._prefill[seq.seq_id] = cache

    def caches_of(self, seq_id: str) -> list[KVCache] | None:
        """A sequence's current per-layer caches (views; copy before keeping them).

        Args:
            seq_id: The sequence.

        Returns:
            The caches, or None if the runner holds nothing for it.
        """
        if seq_id in self._prefill:
            return self._prefill[seq_id]
        if seq_id in self._rows and self._batch is not None:
            row = self._rows.index(seq_id)
            return [layer.extract(row) for layer in self._batch]
        return None

    def step(self, plan: StepPlan) -> StepResult:
        """Release finished sequences, run prefill chunks and decodes, sample.

        Args:
            plan: From ``Scheduler.schedule()``.

        Returns:
            The sampled tokens.
        """
        self._release(plan.released)
        result = StepResult()
        logits: list[mx.array] = []  # each [1 or B, V]
        order: list[Sequence] = []
        finished_prefill: list[str] = []
        for chunk in plan.prefills:
            seq_id = chunk.seq.seq_id
            cache = self._prefill.setdefault(seq_id, self.model.make_cache())
            tokens = mx.array([chunk.seq.prompt_ids[chunk.start : chunk.end]], dtype=mx.int32)
            out = self.model(tokens, cache=cache, last_only=chunk.is_last)  # [1, L or 1, V]
            if chunk.is_last:
                logits.append(out[:, -1, :])
                order.append(chunk.seq)
                finished_prefill.append(seq_id)
            else:
                mx.async_eval([c.keys for c in cache])  # start the chunk; nothing to sample
        if plan.decodes:
            by_id = {s.seq_id: s for s in plan.decodes}
            logits.append(self._decode(by_id))
            order.extend(by_id[r] for r in self._rows)
        if order:
            batch_logits = mx.concatenate(logits, axis=0)  # [B, V]
            allowed = self._allowed(order, batch_logits)
            out = self.sampler(batch_logits, order, allowed)
            result.samples = {s.seq_id: t for s, t in zip(order, out.to_lists(order))}
        self._join(finished_prefill)
        return result

    @staticmethod
    def _allowed(order: list[Sequence], logits: mx.array) -> mx.array | None:
        """The grammar mask of the batch, or None (nothing to pay) when no row is constrained."""
        row_matchers = [s.matcher for s in order]
        if all(m is None for m in row_matchers):
            return None
        # Start the model now: its graph runs while the CPU walks the grammars.
        mx.async_eval(logits)
        return allowed_mask(row_matchers, logits.shape[-1])

    def _decode(self, by_id: dict[str, Sequence]) -> mx.array:
        """One token for every row of the decode batch; returns logits ``[B, V]``."""
        if set(by_id) != set(self._rows):
            raise RuntimeError("the plan's decode rows differ from the runner's decode batch")
        tokens = mx.array([[by_id[r].last_token] for r in self._rows], dtype=mx.int32)  # [B, 1]
        return self.model(tokens, cache=self._batch)[:, -1, :]

    def _join(self, seq_ids: list[str]) -> None:
        """Move sequences whose prompt is done from their own caches into the decode batch."""
        if not seq_ids:
            return
        layers = [self._prefill.pop(s) for s in seq_ids]  # [seq][layer]
        merged = [BatchKVCache.merge(list(per_layer)) for per_layer in zip(*layers)]
        if self._batch is None:
            self._batch = merged
        else:
            for mine, new in zip(self._batch, merged):
                mine.extend(new)
        self._rows.extend(seq_ids)
        self.max_batch_seen = max(self.max_batch_seen, len(self._rows))

    def _release(self, seqs: list[Sequence]) -> None:
        """Drop released sequences' caches (the engine copied what the prompt cache keeps)."""
        leaving = {s.seq_id for s in seqs}
        for seq_id in leaving & self._prefill.keys():
            del self._prefill[seq_id]
        if any(r in leaving for r in self._rows) and self._batch is not None:
            keep = [i for i, r in enumerate(self._rows) if r not in leaving]
            self._rows = [self._rows[i] for i in keep]
            if keep:
                for layer in self._batch:
                    layer.filter(keep)
            else:
                self._batch = None
