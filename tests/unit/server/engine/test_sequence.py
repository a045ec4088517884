"""``Sequence`` as the sampler's row, and ``check_stop``: every finish reason in one place."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.sequence import FinishReason, Sequence, check_stop

EOS = frozenset({2, 9})


@dataclass
class _Grammar:
    is_done: bool = False


def _seq(output: list[int], matcher: object = None, **params: object) -> Sequence:
    seq = Sequence("r", 1, [5, 6], SamplingParams(**params), eos_ids=EOS, matcher=matcher)
    seq.output_ids.extend(output)
    return seq


@pytest.mark.parametrize(
    ("seq", "flags", "reason"),
    [
        (_seq([7], max_tokens=5), {}, None),
        (_seq([7] * 5, max_tokens=5), {}, FinishReason.LENGTH),
        (_seq([2], max_tokens=5), {"eos": True}, FinishReason.STOP),
        (_seq([7], max_tokens=5), {"stop_string": True}, FinishReason.STOP),
        # STOP outranks LENGTH when the last allowed token is also EOS or ends a stop string.
        (_seq([7] * 4 + [2], max_tokens=5), {"eos": True}, FinishReason.STOP),
        (_seq([7] * 5, max_tokens=5), {"stop_string": True}, FinishReason.STOP),
        (_seq([7], _Grammar(is_done=True), max_tokens=5), {}, FinishReason.STOP),
        (_seq([7] * 5, _Grammar(is_done=False), max_tokens=5), {}, FinishReason.LENGTH),
    ],
)
def test_check_stop_decides_every_reason_in_order(seq, flags, reason) -> None:
    assert check_stop(seq, **flags) is reason


def test_abort_outranks_everything() -> None:
    seq = _seq([2] * 5, _Grammar(is_done=True), max_tokens=5)
    seq.aborted = True
    assert check_stop(seq, eos=True, stop_string=True) is FinishReason.ABORT


def test_a_sequence_is_its_own_sampler_row() -> None:
    seq = _seq([7, 8], min_tokens=3)
    assert (seq.step, seq.choice) == (2, 1)
    assert seq.banned_ids == EOS  # EOS is banned before min_tokens ...
    seq.output_ids.append(8)
    assert seq.banned_ids == frozenset()  # ... and free from then on
    constrained = _seq([], _Grammar(), min_tokens=3)
    assert constrained.banned_ids == frozenset(), "a grammar alone decides when it may end"


def test_ignore_eos_yields_to_a_grammar() -> None:
    assert _seq([], ignore_eos=False).is_eos(2)
    assert not _seq([], ignore_eos=True).is_eos(2)
    assert _seq([], _Grammar(), ignore_eos=True).is_eos(2)
    assert not _seq([], ignore_eos=False).is_eos(7)
