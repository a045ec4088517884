"""The plan of one step: what the scheduler decided and the runner carries out.

It knows which prompt chunks prefill, which sequences decode, which left the scheduler and
which were preempted, and the shape of the work for the step cost model. It does not know how
these were chosen (`server.engine.scheduler`) or how they are computed (`server.engine.runner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.server.engine.sequence import Sequence
from moeserve.server.engine.step_cost import StepShape


@dataclass(slots=True)
class PrefillChunk:
    """Prompt positions `[start, end)` of `seq` to compute in this step.

    `end == seq.prefill_target` means the chunk completes the prefill: the runner samples the
    sequence's first output token from the logits of position `end - 1`, unless the sequence
    already has output (it was preempted and recomputes: its next token is known).
    """

    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        """Whether this chunk finishes the prefill (the sequence decodes next)."""
        return self.end == self.seq.prefill_target

    @property
    def samples(self) -> bool:
        """Whether this chunk yields a token (the last chunk of a first prefill)."""
        return self.is_last and not self.seq.output_ids


@dataclass(slots=True)
class StepPlan:
    """What the runner does in one step, and which sequences it can forget."""

    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    released: list[Sequence] = field(default_factory=list)  # left the scheduler; free their state
    preempted: list[Sequence] = field(default_factory=list)  # back in the queue; free their state
    shape: StepShape = field(default_factory=StepShape)  # the work, for the step cost model

    @property
    def num_batched_tokens(self) -> int:
        """Tokens this step feeds the model: one per decode row plus every chunk's length."""
        return len(self.decodes) + sum(c.end - c.start for c in self.prefills)
