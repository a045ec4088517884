"""The continuous-batching policy: which sequences prefill and which decode in each step.

The scheduler knows sequences, token counts and budgets. It knows nothing of the model, MLX,
text or HTTP: it hands the runner a `StepPlan` and learns the sampled token ids back through
`update`. It is not thread-safe; only the engine thread calls it.

One step, in order (`Scheduler.schedule`):

1. Sequences that finished or were aborted leave every queue and are listed in
   `StepPlan.released`.
2. Every DECODING sequence gets one decode row. Decodes come first and always run, even when
   their count alone exceeds `max_batched_tokens`: the budget limits prefill, never decodes,
   so a long prompt delays running streams by at most one chunk per step.
3. Partly prefilled sequences continue, first come first served, each with a chunk of
   `min(prefill_chunk, remaining_prefill, budget_left)` tokens. With `prefill_step_ratio` set
   (it is 0, off, by default) and some sequence decoding, prefill is also limited by time:
   the step may take `prefill_step_ratio` times as long as its decodes alone would, as
   predicted by a cost model learned from measured steps (`server.engine.step_cost`; the
   engine reports each step through `observe`). The first chunk of a step gets at least
   `MIN_TIMED_CHUNK` tokens, so prompts always progress. With nothing decoding, prefill
   takes the whole token budget: no stream waits on it.
4. Waiting requests are admitted FCFS while slots (`max_running`) and budget remain. A request
   with `n > 1` is admitted as a whole group or not at all; the queue head is never skipped,
   so a large group cannot be starved by smaller requests behind it.

With a KV budget (`KVBudget`), every step also fits in bytes: what running sequences hold plus
what this step's decodes and chunks add must stay within `max_bytes`. When decodes alone would
exceed it, the newest sequence is preempted: it leaves the running set (`StepPlan.preempted`,
whose state the runner frees) and goes back to the head of the queue, to recompute its
prompt and output so far when bytes free up; its output is unchanged. Chunks are shortened to
fit, and a request is admitted only when its first chunks fit. A request that could not fit
even alone is refused at `add` (`KVBudgetError`).

Release contract: every sequence leaves the scheduler exactly once, through
`StepPlan.released` — finished or aborted, whether or not it ever ran (the runner frees
whatever it holds for it, possibly nothing). Aborted sequences come out with
`finish_reason == FinishReason.ABORT`, so the engine sends their final event from `released`;
sequences that finished otherwise were already reported when the engine called `finish`.

The scheduler does not decide why a sequence ends: `update` only appends tokens, and the
engine asks `sequence.check_stop` (EOS, stop strings, grammar, length) and calls `finish`.

Its limits and the refusals at admission (`SchedulerConfig`, `KVBudget`, `check_request` and
the errors) live in `server.engine.limits`; the plan it returns (`StepPlan`, `PrefillChunk`)
in `server.engine.step_plan`. Both are importable from here as well.
"""

from __future__ import annotations

from collections import deque

# ContextLengthError is only re-exported: the API and the tests import it from here.
from moeserve.server.engine.limits import ContextLengthError as ContextLengthError
from moeserve.server.engine.limits import (
    KVBudget,
    KVBudgetError,
    QueueFullError,
    SchedulerConfig,
    check_request,
)
from moeserve.server.engine.sequence import FinishReason, Sequence, SequenceStatus, check_stop
from moeserve.server.engine.step_cost import StepCostModel, StepShape
from moeserve.server.engine.step_plan import PrefillChunk, StepPlan

MIN_TIMED_CHUNK = 16  # tokens a step's first chunk gets whatever the time budget says


class Scheduler:
    """FCFS continuous batching with chunked prefill under a per-step token budget.

    Args:
        config: the limits to enforce.
        budget: the KV byte budget, or None for none.
    """

    def __init__(self, config: SchedulerConfig, budget: KVBudget | None = None) -> None:
        self.config = config
        self.budget = budget
        self.preemptions = 0  # sequences preempted so far (metrics)
        self._waiting: deque[list[Sequence]] = deque()  # one entry per request (its n sequences)
        self._running: list[Sequence] = []  # PREFILLING and DECODING, in admission order
        self._requests: dict[str, list[Sequence]] = {}  # request id -> its sequences
        self._in_flight = False  # a plan was scheduled and update() has not been called yet
        self._bytes = 0  # KV bytes counted for the step being planned
        self.cost = StepCostModel()  # learns step seconds from observe()
        self._time_left: float | None = None  # prefill seconds left in the step being planned

    @property
    def num_waiting(self) -> int:
        """Sequences queued without a slot."""
        return sum(len(group) for group in self._waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return len(self._running)

    @property
    def has_work(self) -> bool:
        """Whether `schedule()` has anything to run or release."""
        return bool(self._waiting or self._running)

    def add(self, seqs: list[Sequence]) -> None:
        """Queue all sequences of one request, atomically.

        A prompt that is entirely cached still needs its last token recomputed to get logits,
        so `num_cached` is capped at `len(prompt_ids) - 1`; the engine must keep only that
        many reused KV positions. `num_computed` starts at `num_cached`.

        Args:
            seqs: the request's sequences (one per choice), sharing one `request_id`.

        Raises:
            ValueError: no sequences, mixed or duplicate request ids, an empty prompt,
                `max_tokens < 1`, a negative `num_cached`, or more choices than `max_running`
                or `max_waiting`.
            ContextLengthError: prompt plus `max_tokens` exceed `max_model_len`.
            KVBudgetError: one sequence's prompt plus `max_tokens` need more cache memory than
                the whole budget.
            QueueFullError: the waiting queue would exceed `max_waiting` sequences.
        """
        check_request(seqs, self.config, self._requests)
        cfg = self.config
        self._check_fits(seqs)
        if self.num_waiting + len(seqs) > cfg.max_waiting:
            raise QueueFullError(
                f"too many queued requests ({self.num_waiting} sequences waiting, limit "
                f"{cfg.max_waiting}); retry later"
            )
        for seq in seqs:
            seq.num_cached = min(seq.num_cached, len(seq.prompt_ids) - 1)
            seq.num_computed = seq.num_cached
            seq.status = SequenceStatus.WAITING
        self._waiting.append(list(seqs))
        self._requests[seqs[0].request_id] = list(seqs)

    def _check_fits(self, seqs: list[Sequence]) -> None:
        """Refuse what could never run within the KV budget, even alone."""
        if self.budget is None:
            return
        seq = seqs[0]
        positions = len(seq.prompt_ids) + seq.params.max_tokens
        need = self.budget.row(positions, min(self.config.prefill_chunk, positions))
        first = len(seqs) * self.budget.row(min(self.config.prefill_chunk, len(seq.prompt_ids)))
        if need > self.budget.max_bytes or first > self.budget.max_bytes:
            raise KVBudgetError(
                f"this request needs up to {max(need, first)} bytes of KV cache "
                f"({positions} tokens x {len(seqs)} choices at "
                f"{self.budget.layout.bytes_per_token} bytes per token), more than the "
                f"server's kv_cache_max_bytes "
                f"({self.budget.max_bytes}); reduce max_tokens, the prompt or n"
            )

    def abort(self, request_id: str) -> None:
        """Cancel a request; its unfinished sequences leave at the next `schedule()`.

        They appear in that plan's `released` with `FinishReason.ABORT`. Unknown or already
        released requests are ignored, so a late cancel is harmless.

        Args:
            request_id: the request to cancel.
        """
        for seq in self._requests.get(request_id, ()):
            if not seq.is_finished:
                seq.aborted = True

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence (the engine's stop decisions: EOS, stop strings, errors).

        The sequence stays in its queue until the next `schedule()` lists it in `released`.
        A sequence that already finished keeps its first reason.

        Args:
            seq: the sequence to end.
            reason: why it ended.
        """
        if not seq.is_finished:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason

    def schedule(self) -> StepPlan:
        """Plan the next step (policy in the module docstring).

        Returns:
            The plan; `update` must be called with it before the next `schedule`.
        """
        if self._in_flight:
            raise RuntimeError("schedule() called again before update() of the previous plan")
        plan = StepPlan(released=self._release())
        self._bytes = self._fit_decodes(plan)
        plan.decodes = [s for s in self._running if s.status is SequenceStatus.DECODING]
        budget = self.config.max_batched_tokens - len(plan.decodes)
        self._time_left = self._prefill_seconds(plan.decodes)
        for seq in self._running:
            if seq.status is SequenceStatus.PREFILLING and budget > 0:
                budget -= self._chunk(plan, seq, budget)
        while self._waiting and budget > 0 and not plan.preempted and self._has_time(plan):
            group = self._waiting[0]
            if len(self._running) + len(group) > self.config.max_running:
                break  # strict FCFS: the head waits for slots rather than being overtaken
            if not self._first_chunks_fit(group, budget):
                break  # the head waits for bytes as it waits for slots
            self._waiting.popleft()
            for seq in group:
                seq.status = SequenceStatus.PREFILLING
                self._running.append(seq)
                if budget > 0:  # members left without budget continue next step (rule 3)
                    budget -= self._chunk(plan, seq, budget)
        self._in_flight = bool(plan.prefills or plan.decodes)
        plan.shape = StepShape(
            len(plan.decodes),
            sum(s.num_computed + 1 for s in plan.decodes),
            sum(c.end - c.start for c in plan.prefills),
            sum((c.end - c.start) * c.end for c in plan.prefills),
        )
        return plan

    def observe(self, plan: StepPlan, seconds: float) -> None:
        """Learn from a measured step (the engine times the runner on every plan).

        Args:
            plan: A plan this scheduler returned.
            seconds: How long the runner took for it.
        """
        self.cost.observe(plan.shape, seconds)

    def _prefill_seconds(self, decodes: list[Sequence]) -> float | None:
        """Prefill time this step may add beside ``decodes``; None: no time limit."""
        ratio = self.config.prefill_step_ratio
        if not decodes or not ratio or not self.cost.knows_prefill:
            return None
        alone = self.cost.predict(StepShape(len(decodes), sum(s.num_computed + 1 for s in decodes)))
        return (ratio - 1.0) * max(alone or 0.0, 0.0)

    def _has_time(self, plan: StepPlan) -> bool:
        """Whether the step can still take a chunk (always, before its first one)."""
        return self._time_left is None or self._time_left > 0.0 or not plan.prefills

    def _timed_size(self, plan: StepPlan, seq: Sequence, size: int) -> int:
        """Shorten a chunk of ``size`` tokens to the step's time left, and spend that time."""
        if self._time_left is None:
            return size
        fits = self.cost.prefill_within(self._time_left, seq.num_computed, size)
        if not plan.prefills:
            fits = max(fits, min(MIN_TIMED_CHUNK, size))
        d, e = self.cost.coef[3], self.cost.coef[4] / 1024.0
        self._time_left -= d * fits + e * fits * (seq.num_computed + fits)
        return fits

    def _held(self, seq: Sequence) -> int:
        """Bytes a running sequence holds now."""
        return self.budget.row(seq.num_computed) if self.budget else 0

    def _fit_decodes(self, plan: StepPlan) -> int:
        """Preempt the newest sequences until this step's decodes fit; return bytes in use."""
        if self.budget is None:
            return 0
        while True:
            used = sum(
                self.budget.row(s.num_computed + 1)
                if s.status is SequenceStatus.DECODING
                else self._held(s)
                for s in self._running
            )
            if used <= self.budget.max_bytes or len(self._running) <= 1:
                return used
            self._preempt(self._running.pop(), plan)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Free `seq`'s state and queue it first, to recompute when bytes free up."""
        seq.status = SequenceStatus.WAITING
        seq.num_computed = seq.num_cached = 0
        self._waiting.appendleft([seq])
        plan.preempted.append(seq)
        self.preemptions += 1

    def _first_chunks_fit(self, group: list[Sequence], budget: int) -> bool:
        """Whether every member's first chunk fits in the bytes left."""
        if self.budget is None:
            return True
        size = min(self.config.prefill_chunk, budget)
        need = sum(
            self.budget.row(s.num_computed + min(size, s.remaining_prefill), size) for s in group
        )
        return self._bytes + need <= self.budget.max_bytes

    def _chunk(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        """Add the next prompt chunk of `seq` to `plan`, as long as the bytes allow.

        Returns the chunk's length (0: nothing fits this step).
        """
        size = min(self.config.prefill_chunk, seq.remaining_prefill, budget)
        size = self._timed_size(plan, seq, size)
        if size == 0:
            return 0
        if self.budget is not None:
            held = self._held(seq)
            left = self.budget.max_bytes - self._bytes

            def cost(n: int) -> int:
                return self.budget.row(seq.num_computed + n, n) - held

            lo, hi = 0, size  # the longest chunk whose growth fits (cost grows with n)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
            size = lo
            if size == 0:
                return 0
            self._bytes += cost(size)
        plan.prefills.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + size))
        return size

    def _release(self) -> list[Sequence]:
        """Remove finished and aborted sequences from every queue; return them."""
        released: list[Sequence] = []

        def keep(seq: Sequence) -> bool:
            if seq.aborted and not seq.is_finished:
                self.finish(seq, check_stop(seq) or FinishReason.ABORT)
            if seq.is_finished:
                released.append(seq)
                return False
            return True

        self._running = [s for s in self._running if keep(s)]
        groups = [[s for s in group if keep(s)] for group in self._waiting]
        self._waiting = deque(group for group in groups if group)
        for seq in released:
            group = self._requests.get(seq.request_id)
            if group is not None and all(s.is_finished for s in group):
                del self._requests[seq.request_id]
        return released

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Sequence]:
        """Record what the runner computed for `plan`.

        Prefill chunks advance `num_computed`; a chunk that completes its prompt appends the
        first output token and moves the sequence to DECODING. Decode rows advance
        `num_computed` by one and append a token. Whether the token ends the sequence is the
        engine's question (`check_stop`). Sequences finished or aborted since `schedule()` are
        skipped, so after a failed step the engine can `finish(seq, ERROR)` each of them and
        call `update(plan, {})`.

        Args:
            plan: the plan returned by the last `schedule()`.
            sampled: token id sampled for each sequence that produced one, keyed by `seq_id`.

        Returns:
            The sequences that received a token this step, in plan order (prefills first).
        """
        self._in_flight = False
        changed: list[Sequence] = []
        for chunk in plan.prefills:
            seq = chunk.seq
            if seq.is_finished or seq.aborted:
                continue
            seq.num_computed = chunk.end
            if chunk.is_last:
                seq.status = SequenceStatus.DECODING
            if chunk.samples:
                self._append(seq, sampled)
                changed.append(seq)
        for seq in plan.decodes:
            if seq.is_finished or seq.aborted:
                continue
            seq.num_computed += 1
            self._append(seq, sampled)
            changed.append(seq)
        return changed

    @staticmethod
    def _append(seq: Sequence, sampled: dict[str, int]) -> None:
        """Append the sampled token of `seq`."""
        try:
            seq.output_ids.append(sampled[seq.seq_id])
        except KeyError:
            raise KeyError(f"no sampled token for sequence {seq.seq_id!r}") from None
