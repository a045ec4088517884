"""One generation stream: its prompt, its output so far, and when it ends.

A `Sequence` is plain Python data that the scheduler, the runner and the output processor
share on the engine thread. It knows token ids, counters and its grammar matcher; no text,
no HTTP, no MLX arrays. It is also the sampler's row (`Sampler` reads `params`, the token
histories, `banned_ids`, `step` and `choice` from it), so nothing is copied per step.

`check_stop` decides every finish reason in one place: abort, EOS, stop strings, a complete
grammar and the length limit, and which one wins when several hold for the same token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moeserve.server.engine.sampling import SamplingParams

if TYPE_CHECKING:  # the grammar module loads llguidance and MLX; a sequence only holds one
    from moeserve.server.engine.grammar import Matcher


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life.

    WAITING: queued, holds no slot. PREFILLING: admitted, its prompt is being computed in
    chunks. DECODING: the prompt is done, one token per step. FINISHED: left or about to
    leave the scheduler (see `Sequence.finish_reason`).
    """

    WAITING = enum.auto()
    PREFILLING = enum.auto()
    DECODING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(str, enum.Enum):
    """Why a sequence finished; the values are OpenAI's `finish_reason` strings."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(slots=True)
class Sequence:
    """One choice of one request (a request with `n > 1` owns `n` sequences).

    Invariant while DECODING: `num_computed == num_tokens - 1`, because the newest sampled
    token is the next step's input and its KV is not in the cache yet.
    """

    request_id: str
    index: int  # choice index, 0..n-1
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache; starts at num_cached
    num_cached: int = 0  # prompt prefix reused from the prompt cache (engine sets it before add)
    finish_reason: FinishReason | None = None
    aborted: bool = False  # set by Scheduler.abort; the sequence leaves at the next schedule()
    eos_ids: frozenset[int] = frozenset()  # the tokenizer's EOS ids plus the request's stop ids
    matcher: Matcher | None = None  # the grammar state of a constrained choice

    @property
    def seq_id(self) -> str:
        """Unique id of this stream: the request id and the choice index."""
        return f"{self.request_id}/{self.index}"

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (a new list)."""
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        """The token a decode step feeds to the model: the newest one."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def prefill_target(self) -> int:
        """Positions a prefill computes.

        The prompt; after a preemption, everything but the newest token (which the next
        decode step feeds, as it would have).
        """
        return self.num_tokens - 1 if self.output_ids else len(self.prompt_ids)

    @property
    def remaining_prefill(self) -> int:
        """Tokens whose cache state still has to be computed (0 once decoding)."""
        return max(0, self.prefill_target - self.num_computed)

    @property
    def is_finished(self) -> bool:
        """Whether the sequence has finished for any reason."""
        return self.status is SequenceStatus.FINISHED

    # ----- the sampler's view (server.engine.sampling.SamplerRow) ------------------------------

    @property
    def step(self) -> int:
        """Tokens sampled so far: indexes a seeded row's noise."""
        return len(self.output_ids)

    @property
    def choice(self) -> int:
        """The choice index: seeded choices of one request draw differently."""
        return self.index

    @property
    def banned_ids(self) -> frozenset[int]:
        """EOS is banned until `min_tokens`; a grammar alone decides when its output may end.

        A ban on the only token a complete grammar allows would leave nothing to sample.
        """
        if self.matcher is not None or len(self.output_ids) >= self.params.min_tokens:
            return frozenset()
        return self.eos_ids

    def is_eos(self, token: int) -> bool:
        """Whether `token` ends the choice as EOS (`ignore_eos` does not apply to grammars).

        Args:
            token: A sampled token.

        Returns:
            True for an EOS or stop id that counts.
        """
        return token in self.eos_ids and (not self.params.ignore_eos or self.matcher is not None)


def check_stop(
    seq: Sequence, *, eos: bool = False, stop_string: bool = False
) -> FinishReason | None:
    """Whether a sequence ends now, and why: every finish reason is decided here.

    Called for each sampled token (after the grammar advanced and the text was matched
    against the stop strings) and by the scheduler for sequences it is about to release.
    The first rule that holds wins:

    1. ABORT: the client cancelled (or its request failed).
    2. STOP: the token is EOS or a stop id, a stop string appeared, or the grammar is
       complete (nothing but EOS could follow). STOP outranks LENGTH on the same token.
    3. LENGTH: `max_tokens` tokens were generated.

    Args:
        seq: The sequence, its newest token already in `output_ids`.
        eos: The newest token is EOS (see `Sequence.is_eos`).
        stop_string: The newest text completed a stop string.

    Returns:
        The reason, or None while the sequence goes on.
    """
    if seq.aborted:
        return FinishReason.ABORT
    if eos or stop_string or (seq.matcher is not None and seq.matcher.is_done):
        return FinishReason.STOP
    if len(seq.output_ids) >= seq.params.max_tokens:
        return FinishReason.LENGTH
    return None
