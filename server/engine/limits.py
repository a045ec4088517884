"""The scheduler's limits, and the refusals a request meets when it breaks one.

It knows `SchedulerConfig` (slots, token budgets, queue length, context length), `KVBudget`
(the bytes running sequences' cache may hold), the three errors the API turns into status
codes, and `check_request`: what a request must be before anything of it is queued. It does
not know queues, steps or plans: whether a request fits beside the others now, and when it
runs, is the scheduler's question (`server.engine.scheduler`), as is the KV byte check at
admission (`Scheduler._check_fits`).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, fields

from moeserve.models.cache import CacheLayout
from moeserve.server.engine.sequence import Sequence


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
    # A step carrying prefill beside decodes may take this multiple of the decodes alone
    # (predicted); 0 turns the time limit off (the token budget alone, as before issue 18).
    prefill_step_ratio: float = 0.0  # off by default: bench/RESULTS.md section 15

    def __post_init__(self) -> None:
        ratio = self.prefill_step_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"SchedulerConfig.prefill_step_ratio must be a number, got {ratio!r}")
        if ratio != 0 and not ratio >= 1.0:
            raise ValueError(
                f"SchedulerConfig.prefill_step_ratio must be 0 (off) or >= 1, got {ratio!r}"
            )
        for f in fields(self):
            if f.name == "prefill_step_ratio":
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{f.name} must be a positive int, got {value!r}")
        if self.prefill_chunk > self.max_batched_tokens:
            raise ValueError(
                f"SchedulerConfig.prefill_chunk ({self.prefill_chunk}) must not exceed "
                f"max_batched_tokens ({self.max_batched_tokens})"
            )


@dataclass(frozen=True)
class KVBudget:
    """The bytes that running sequences' cache state may hold, and what a row costs."""

    layout: CacheLayout
    max_bytes: int

    def row(self, positions: int, new: int = 1) -> int:
        """Bytes of one row holding ``positions`` positions (``CacheLayout.row_bytes``)."""
        return self.layout.row_bytes(positions, new)


class KVBudgetError(ValueError):
    """A request needs more cache memory than the whole budget; the API answers 400."""


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


def check_request(seqs: list[Sequence], config: SchedulerConfig, scheduled: Container[str]) -> None:
    """Reject malformed groups before anything is queued (see `Scheduler.add`).

    Args:
        seqs: the request's sequences (one per choice), sharing one `request_id`.
        config: the limits to enforce.
        scheduled: the request ids the scheduler holds now.

    Raises:
        ValueError: no sequences, mixed or duplicate request ids, an empty prompt,
            `max_tokens < 1`, a negative `num_cached`, or more choices than `max_running`
            or `max_waiting`.
        ContextLengthError: prompt plus `max_tokens` exceed `max_model_len`.
    """
    if not seqs:
        raise ValueError("a request needs at least one sequence")
    request_id = seqs[0].request_id
    if any(s.request_id != request_id for s in seqs):
        raise ValueError("all sequences of one add() must share a request_id")
    if request_id in scheduled:
        raise ValueError(f"request {request_id!r} is already scheduled")
    if len(seqs) > config.max_running:
        raise ValueError(f"n={len(seqs)} exceeds the server's max_running ({config.max_running})")
    if len(seqs) > config.max_waiting:
        # Never admissible, so a 400 rather than QueueFullError's "retry later".
        raise ValueError(f"n={len(seqs)} exceeds the server's max_waiting ({config.max_waiting})")
    for seq in seqs:
        if not seq.prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        if seq.params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {seq.params.max_tokens}")
        if seq.num_cached < 0:
            raise ValueError(f"num_cached must be >= 0, got {seq.num_cached}")
    for seq in seqs:
        if len(seq.prompt_ids) + seq.params.max_tokens > config.max_model_len:
            raise ContextLengthError(
                len(seq.prompt_ids), seq.params.max_tokens, config.max_model_len
            )
