"""Executes a ``StepPlan`` on the model: chunked prefill, batched decode, sampling.

The runner owns the ``CacheStore`` that holds every running sequence's cache state (blocks
and slots, per cache kind: ``models/cache``). A prefill chunk is a pass over one row; when
its prompt is done the row joins the decode batch, which is only a list of rows: joining or
leaving touches that row's blocks alone. A preempted sequence's state is freed like a
finished one's; the scheduler has it recompute later.

It knows token ids, logits and caches; it does not know text, stop strings, HTTP or policy
(the scheduler decides who runs). Its only host synchronisation per step is the sampler's
``to_lists``: the model's work for prefill chunks, decode rows and sampling is one graph.
Each ``Sequence`` is its own sampler row (parameters, histories, banned ids). When some rows
follow a grammar (``Sequence.matcher``), the graph is started first and their allowed-token
mask (``server.engine.grammar_mask.allowed_mask``) is computed on the CPU meanwhile; the output
processor advances the matchers with the sampled tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import mlx.core as mx

from moeserve.models.base import LanguageModel
from moeserve.models.cache import CacheStore, Snapshot, StepCache
from moeserve.server.engine.grammar_mask import allowed_mask
from moeserve.server.engine.sampling import Sampler, TokenSample
from moeserve.server.engine.scheduler import StepPlan
from moeserve.server.engine.sequence import Sequence

logger = logging.getLogger(__name__)

# Turn boundaries a snapshot keeps for recurrent layers (the latest ones): each is one copy of
# every recurrent layer's state, so a long agent loop would otherwise grow its entry per turn.
MAX_BOUNDARIES = 8


@dataclass(slots=True)
class ChunkWork:
    """One prefill chunk as the model sees it: plain data, so it can cross between ranks."""

    seq_id: str
    tokens: list[int]  # prompt positions [end - len(tokens), end)
    end: int
    is_last: bool  # completes the prefill (the row joins the decode batch)
    samples: bool  # yields a token (the last chunk of a first prefill)
    first: bool  # the sequence has no output yet (its prompt-end recurrent state is kept)


@dataclass
class StepWork:
    """The model's part of a ``StepPlan``: leavers, chunks and the decode rows' last tokens.

    Only ids and tokens: what a rank that owns no scheduler needs to run the same passes.
    """

    leaving: list[str] = field(default_factory=list)  # released or preempted seq ids
    chunks: list[ChunkWork] = field(default_factory=list)
    decodes: dict[str, int] = field(default_factory=dict)  # seq_id -> its last token

    @classmethod
    def from_plan(cls, plan: StepPlan) -> StepWork:
        """Extract the work of a scheduler's plan.

        Args:
            plan: From ``Scheduler.schedule()``.

        Returns:
            The work.
        """
        chunks = [
            ChunkWork(
                c.seq.seq_id,
                list(c.seq.all_ids[c.start : c.end]),
                c.end,
                c.is_last,
                c.samples,
                not c.seq.output_ids,
            )
            for c in plan.prefills
        ]
        return cls(
            leaving=[s.seq_id for s in plan.released + plan.preempted],
            chunks=chunks,
            decodes={s.seq_id: s.last_token for s in plan.decodes},
        )


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
        max_bytes: The KV budget; the store's spare capacity never grows past it.
        kv_bits: Store positional cache tensors quantized at 8 or 4 bits (None: as computed).
    """

    def __init__(
        self,
        model: LanguageModel,
        sampler: Sampler | None = None,
        max_bytes: int | None = None,
        kv_bits: int | None = None,
    ) -> None:
        self.model = model
        self.sampler = sampler or Sampler()
        layout = model.cache_layout().quantized(kv_bits)
        self.store = CacheStore(layout, model.cache_dtype(), max_bytes)
        self._rows: list[str] = []  # decode batch row order (seq ids)
        # Recurrent states at turn boundaries (the ends of earlier prompts and replies, and of
        # this prompt): exact there only, so the prompt cache can resume a later turn from
        # the longest one the new prompt still shares (seq_id -> {position: states}).
        self._boundaries: dict[str, dict[int, list]] = {}
        self.max_batch_seen = 0  # largest decode batch so far (tests and stats)

    @property
    def num_decoding(self) -> int:
        """Rows in the decode batch."""
        return len(self._rows)

    def adopt_prefix(self, seq: Sequence, snap: Snapshot) -> None:
        """Start ``seq``'s prefill from a reused prompt-cache prefix.

        Args:
            seq: A sequence whose ``num_computed`` is a usable length of ``snap``.
            snap: The prompt-cache entry's state (copied into the store; never modified).
        """
        self.store.adopt(seq.seq_id, snap, seq.num_computed)
        if self.store.states is not None:  # the entry's boundaries hold for this prefix too
            kept = {p: s for p, s in snap.boundaries.items() if p <= seq.num_computed}
            if snap.length <= seq.num_computed:
                kept[snap.length] = [snap.layers[i] for i in self.store.layout.recurrent]
            self._boundaries[seq.seq_id] = kept

    def snapshot(self, seq_id: str) -> Snapshot | None:
        """A copy of a sequence's cache state, with its prompt-end recurrent state.

        Args:
            seq_id: The sequence.

        Returns:
            The snapshot, or None if the runner holds nothing for it.
        """
        if seq_id not in self.store.rows or self.store.rows[seq_id].length == 0:
            return None
        snap = self.store.snapshot(seq_id)
        saved = self._boundaries.get(seq_id, {})
        for position in sorted(p for p in saved if p < snap.length)[-MAX_BOUNDARIES:]:
            snap.boundaries[position] = saved[position]
        return snap

    def step(self, plan: StepPlan) -> StepResult:
        """Release finished sequences, run prefill chunks and decodes, sample.

        Args:
            plan: From ``Scheduler.schedule()``.

        Returns:
            The sampled tokens.
        """
        work = StepWork.from_plan(plan)
        logits, order_ids = self.forward(work)
        result = StepResult()
        if order_ids:
            seqs = {c.seq.seq_id: c.seq for c in plan.prefills}
            seqs.update((s.seq_id, s) for s in plan.decodes)
            order = [seqs[i] for i in order_ids]
            batch_logits = mx.concatenate(logits, axis=0)  # [B, V]
            allowed = self._allowed(order, batch_logits)
            out = self.sampler(batch_logits, order, allowed)
            result.samples = {s.seq_id: t for s, t in zip(order, out.to_lists(order))}
        return result

    def forward(self, work: StepWork) -> tuple[list[mx.array], list[str]]:
        """The model's part of a step: free leavers, run the chunks and the decode batch.

        Split from ``step`` so that a distributed rank that does not sample runs the same
        passes from a plan it received (``server.distributed``).

        Args:
            work: The step's chunks, decode tokens and leavers.

        Returns:
            The outputs to sample from (each ``[1 or B, V]``; lazy) and their rows' seq ids.
        """
        self._release(work.leaving)
        logits: list[mx.array] = []  # each [1 or B, V]
        order: list[str] = []
        finished_prefill: list[str] = []
        for chunk in work.chunks:
            seq_id = chunk.seq_id
            if seq_id not in self.store.rows:
                self.store.add(seq_id)
            cache = StepCache(self.store, [seq_id], len(chunk.tokens))
            tokens = mx.array([chunk.tokens], dtype=mx.int32)
            out = self.model(tokens, cache=cache, last_only=chunk.is_last)  # [1, L or 1, V]
            if chunk.is_last:
                finished_prefill.append(seq_id)
                if self.store.states is not None and chunk.first:
                    states = self.store.recurrent_state(seq_id)
                    self._boundaries.setdefault(seq_id, {})[chunk.end] = states
            if chunk.samples:
                logits.append(out[:, -1, :])
                order.append(seq_id)
            else:
                mx.async_eval(cache.arrays())  # start the chunk; nothing to sample
        if work.decodes:
            logits.append(self._decode(work.decodes))
            order.extend(self._rows)
        self._rows.extend(finished_prefill)  # joining the batch copies nothing
        self.max_batch_seen = max(self.max_batch_seen, len(self._rows))
        return logits, order

    @staticmethod
    def _allowed(order: list[Sequence], logits: mx.array) -> mx.array | None:
        """The grammar mask of the batch, or None (nothing to pay) when no row is constrained."""
        row_matchers = [s.matcher for s in order]
        if all(m is None for m in row_matchers):
            return None
        # Start the model now: its graph runs while the CPU walks the grammars.
        mx.async_eval(logits)
        return allowed_mask(row_matchers, logits.shape[-1])

    def _decode(self, last: dict[str, int]) -> mx.array:
        """One token for every row of the decode batch; returns logits ``[B, V]``."""
        if set(last) != set(self._rows):
            raise RuntimeError("the plan's decode rows differ from the runner's decode batch")
        tokens = mx.array([[last[r]] for r in self._rows], dtype=mx.int32)  # [B, 1]
        cache = StepCache(self.store, self._rows, 1)
        return self.model(tokens, cache=cache)[:, -1, :]

    def _release(self, seq_ids: list[str]) -> None:
        """Drop released or preempted sequences' state (the engine copied what it keeps)."""
        leaving = set(seq_ids)
        if not leaving:
            return
        self._rows = [r for r in self._rows if r not in leaving]
        for seq_id in leaving:
            self.store.remove(seq_id)
            self._boundaries.pop(seq_id, None)
