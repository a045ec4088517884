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
   `min(prefill_chunk, remaining_prefill, budget_left)` tokens.
4. Waiting requests are admitted FCFS while slots (`max_running`) and budget remain. A request
   with `n > 1` is admitted as a whole group or not at all; the queue head is never skipped,
   so a large group cannot be starved by smaller requests behind it.

Release contract: every sequence leaves the scheduler exactly once, through
`StepPlan.released` — finished or aborted, whether or not it ever ran (the runner frees
whatever it holds for it, possibly nothing). Aborted sequences come out with
`finish_reason == FinishReason.ABORT`, so the engine sends their final event from `released`;
sequences that finished otherwise were already reported when the engine called `finish`.

The scheduler does not decide why a sequence ends: `update` only appends tokens, and the
engine asks `sequence.check_stop` (EOS, stop strings, grammar, length) and calls `finish`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields

from moeserve.server.engine.sequence import FinishReason, Sequence, SequenceStatus, check_stop


@dataclass(slots=True)
class SchedulerConfig:
    """Limits of the scheduler; validated on construction."""

    max_running: int = 32  # sequences holding a slot (prefilling or decoding)
    max_batched_tokens: int = (
        2048  # per-step tokens: 1 per decode row, a chunk's length per prefill
    )
    max_waiting: int = 256  # queued sequences beyond which add() refuses (HTTP 429)
    prefill_chunk: int = 512  # longest prompt slice computed for one sequence in one step
    max_model_len: int = 4096  # prompt + max_tokens limit of one sequence

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{f.name} must be a positive int, got {value!r}")
        if self.prefill_chunk > self.max_batched_tokens:
            raise ValueError(
                f"SchedulerConfig.prefill_chunk ({self.prefill_chunk}) must not exceed "
                f"max_batched_tokens ({self.max_batched_tokens})"
            )


class QueueFullError(Exception):
    """The waiting queue cannot take the request now; the API answers 429."""


class ContextLengthError(ValueError):
    """Prompt plus requested completion exceed the model's context; the API answers 400."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion."
        )


@dataclass(slots=True)
class PrefillChunk:
    """Prompt positions `[start, end)` of `seq` to compute in this step.

    `end == len(seq.prompt_ids)` means the chunk completes the prompt: the runner samples the
    sequence's first output token from the logits of position `end - 1`.
    """

    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        """Whether this chunk finishes the prompt (and so yields a token)."""
        return self.end == len(self.seq.prompt_ids)


@dataclass(slots=True)
class StepPlan:
    """What the runner does in one step, and which sequences it can forget."""

    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    released: list[Sequence] = field(default_factory=list)  # left the scheduler; free their state

    @property
    def num_batched_tokens(self) -> int:
        """Tokens this step feeds the model: one per decode row plus every chunk's length."""
        return len(self.decodes) + sum(c.end - c.start for c in self.prefills)


class Scheduler:
    """FCFS continuous batching with chunked prefill under a per-step token budget.

    Args:
        config: the limits to enforce.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting: deque[list[Sequence]] = deque()  # one entry per request (its n sequences)
        self._running: list[Sequence] = []  # PREFILLING and DECODING, in admission order
        self._requests: dict[str, list[Sequence]] = {}  # request id -> its sequences
        self._in_flight = False  # a plan was scheduled and update() has not been called yet

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
            QueueFullError: the waiting queue would exceed `max_waiting` sequences.
        """
        self._validate(seqs)
        cfg = self.config
        for seq in seqs:
            if len(seq.prompt_ids) + seq.params.max_tokens > cfg.max_model_len:
                raise ContextLengthError(
                    len(seq.prompt_ids), seq.params.max_tokens, cfg.max_model_len
                )
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

    def _validate(self, seqs: list[Sequence]) -> None:
        """Reject malformed groups before anything is queued (see `add`)."""
        if not seqs:
            raise ValueError("a request needs at least one sequence")
        request_id = seqs[0].request_id
        if any(s.request_id != request_id for s in seqs):
            raise ValueError("all sequences of one add() must share a request_id")
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already scheduled")
        if len(seqs) > self.config.max_running:
            raise ValueError(
                f"n={len(seqs)} exceeds the server's max_running ({self.config.max_running})"
            )
        if len(seqs) > self.config.max_waiting:
            # Never admissible, so a 400 rather than QueueFullError's "retry later".
            raise ValueError(
                f"n={len(seqs)} exceeds the server's max_waiting ({self.config.max_waiting})"
            )
        for seq in seqs:
            if not seq.prompt_ids:
                raise ValueError("the prompt must contain at least one token")
            if seq.params.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {seq.params.max_tokens}")
            if seq.num_cached < 0:
                raise ValueError(f"num_cached must be >= 0, got {seq.num_cached}")

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
        plan.decodes = [s for s in self._running if s.status is SequenceStatus.DECODING]
        budget = self.config.max_batched_tokens - len(plan.decodes)
        for seq in self._running:
            if seq.status is SequenceStatus.PREFILLING and budget > 0:
                budget -= self._chunk(plan, seq, budget)
        while self._waiting and budget > 0:
            group = self._waiting[0]
            if len(self._running) + len(group) > self.config.max_running:
                break  # strict FCFS: the head waits for slots rather than being overtaken
            self._waiting.popleft()
            for seq in group:
                seq.status = SequenceStatus.PREFILLING
                self._running.append(seq)
                if budget > 0:  # members left without budget continue next step (rule 3)
                    budget -= self._chunk(plan, seq, budget)
        self._in_flight = bool(plan.prefills or plan.decodes)
        return plan

    def _chunk(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        """Add the next prompt chunk of `seq` to `plan`; return its length."""
        size = min(self.config.prefill_chunk, seq.remaining_prefill, budget)
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
