"""Scheduler policy tests: no model, the runner is faked by a token counter."""

from __future__ import annotations

import itertools
import math

import pytest

from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import (
    ContextLengthError,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from moeserve.server.engine.sequence import FinishReason, Sequence, SequenceStatus, check_stop


def make(rid: str, prompt_len: int, n: int = 1, max_tokens: int = 8, cached: int = 0):
    """The n sequences of one request with a prompt of `prompt_len` tokens."""
    params = SamplingParams(max_tokens=max_tokens)
    return [
        Sequence(rid, i, list(range(1, prompt_len + 1)), params, num_cached=cached)
        for i in range(n)
    ]


def add(sched: Scheduler, rid: str, prompt_len: int, **kw) -> list[Sequence]:
    """Queue a request built by `make` and return its sequences."""
    seqs = make(rid, prompt_len, **kw)
    sched.add(seqs)
    return seqs


def fake_token(seq: Sequence) -> int:
    """A token that tells which output position it was sampled for."""
    return 100 + len(seq.output_ids)


def step(sched: Scheduler) -> StepPlan:
    """One engine step with a fake runner: sample for every decode row and finishing chunk."""
    plan = sched.schedule()
    assert all(c.end > c.start for c in plan.prefills), "empty prefill chunk"
    sampled = {c.seq.seq_id: fake_token(c.seq) for c in plan.prefills if c.is_last}
    sampled.update({s.seq_id: fake_token(s) for s in plan.decodes})
    for seq in sched.update(plan, sampled):  # the engine's stop decision, as it makes it
        if (reason := check_stop(seq)) is not None:
            sched.finish(seq, reason)
    return plan


def prefilled_ids(plan: StepPlan) -> list[str]:
    return [c.seq.seq_id for c in plan.prefills]


def config(**kw) -> SchedulerConfig:
    base = dict(max_running=4, max_batched_tokens=64, max_waiting=16, prefill_chunk=16)
    base.update(kw)
    return SchedulerConfig(**base)


def test_fcfs_admission_order_and_slot_reuse():
    sched = Scheduler(config(max_running=2))
    a, _, _ = (add(sched, rid, 3)[0] for rid in "ABC")
    assert prefilled_ids(step(sched)) == ["A/0", "B/0"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    sched.finish(a, FinishReason.STOP)
    plan = step(sched)
    assert plan.released == [a]
    assert [s.seq_id for s in plan.decodes] == ["B/0"]
    assert prefilled_ids(plan) == ["C/0"]


def test_max_running_caps_admission():
    sched = Scheduler(config(max_running=3))
    for i in range(5):
        sched.add(make(f"r{i}", 2))
    plan = step(sched)
    assert len(plan.prefills) == 3
    assert (sched.num_running, sched.num_waiting) == (3, 2)
    # The slots stay full while the three decode: nobody else gets in.
    for _ in range(3):
        plan = step(sched)
        assert len(plan.decodes) == 3 and not plan.prefills


def test_token_budget_splits_prefill_across_sequences():
    sched = Scheduler(config(max_batched_tokens=10, prefill_chunk=8))
    sched.add(make("A", 6))
    sched.add(make("B", 6))
    plan = step(sched)
    assert [(c.start, c.end) for c in plan.prefills] == [(0, 6), (0, 4)]
    assert plan.num_batched_tokens == 10
    plan = step(sched)  # A decodes (1), B finishes its prompt (2)
    assert [s.seq_id for s in plan.decodes] == ["A/0"]
    assert [(c.start, c.end) for c in plan.prefills] == [(4, 6)]


def test_group_member_without_budget_continues_next_step():
    sched = Scheduler(config(max_batched_tokens=4, prefill_chunk=4))
    first, second = add(sched, "A", 10, n=2)
    plan = step(sched)  # both take a slot, only the first gets budget
    assert [(c.seq, c.start, c.end) for c in plan.prefills] == [(first, 0, 4)]
    assert second.status is SequenceStatus.PREFILLING and sched.num_running == 2
    plan = step(sched)  # FCFS: the first still uses the whole budget
    assert [(c.seq, c.start, c.end) for c in plan.prefills] == [(first, 4, 8)]
    plan = step(sched)  # first finishes its prompt (2 tokens), second gets the rest (2)
    assert [(c.seq, c.start, c.end) for c in plan.prefills] == [(first, 8, 10), (second, 0, 2)]


def test_decodes_filling_the_budget_block_prefill_not_decodes():
    sched = Scheduler(config(max_running=3, max_batched_tokens=2, prefill_chunk=2))
    sched.add(make("A", 1))
    sched.add(make("B", 1))
    sched.add(make("C", 1))
    step(sched)  # A and B take the whole budget
    for _ in range(3):
        plan = step(sched)
        assert [s.seq_id for s in plan.decodes] == ["A/0", "B/0"]
        assert not plan.prefills
    assert sched.num_waiting == 1


def test_chunked_prefill_interleaves_with_decodes():
    chunk, prompt_len = 8, 50
    sched = Scheduler(config(max_batched_tokens=10, prefill_chunk=chunk))
    short = add(sched, "s1", 2, max_tokens=40) + add(sched, "s2", 3, max_tokens=40)
    step(sched)
    long_seq = add(sched, "long", prompt_len, max_tokens=4)[0]
    steps = 0
    while long_seq.status is not SequenceStatus.DECODING:
        before = [len(s.output_ids) for s in short]
        plan = step(sched)
        steps += 1
        assert plan.decodes == short  # every running stream advanced in this very step
        assert [len(s.output_ids) for s in short] == [n + 1 for n in before]
        assert all(c.end - c.start <= chunk for c in plan.prefills)
        assert plan.num_batched_tokens <= 10
    assert steps == math.ceil(prompt_len / chunk)
    assert long_seq.num_computed == prompt_len


@pytest.mark.parametrize("prompt_len", [1, 7, 8, 9, 33])
def test_long_prompt_takes_ceil_len_over_chunk_steps(prompt_len):
    sched = Scheduler(config(prefill_chunk=8))
    seq = add(sched, "A", prompt_len)[0]
    spans = []
    while seq.status is not SequenceStatus.DECODING:
        spans += [(c.start, c.end) for c in step(sched).prefills]
    assert len(spans) == math.ceil(prompt_len / 8)
    # Contiguous, covering the whole prompt exactly once.
    assert spans[0][0] == 0 and spans[-1][1] == prompt_len
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert seq.output_ids == [100]


def test_queue_full_refuses_and_enqueues_nothing():
    sched = Scheduler(config(max_waiting=3))
    sched.add(make("A", 2, n=2))
    with pytest.raises(QueueFullError):
        sched.add(make("B", 2, n=2))
    assert sched.num_waiting == 2
    sched.add(make("B", 2))  # the refused id was not registered; one more still fits
    assert sched.num_waiting == 3


def test_context_length_error_wording_and_checked_first():
    sched = Scheduler(config(max_model_len=16, max_waiting=1))
    sched.add(make("ok", 10, max_tokens=6))  # 16 tokens: exactly fits
    with pytest.raises(ContextLengthError) as info:
        sched.add(make("big", 10, max_tokens=7))  # queue is also full: context wins
    assert str(info.value) == (
        "This model's maximum context length is 16 tokens. However, you requested 17 tokens "
        "(10 in the messages, 7 in the completion). Please reduce the length of the messages "
        "or completion."
    )
    assert sched.num_waiting == 1


def test_group_is_admitted_whole_and_head_is_not_overtaken():
    sched = Scheduler(config(max_running=4))
    group_a = add(sched, "A", 2, n=2)
    add(sched, "B", 2, n=3)
    add(sched, "C", 2)
    plan = step(sched)
    assert prefilled_ids(plan) == ["A/0", "A/1"]  # B does not fit; C waits behind B
    assert sched.num_waiting == 4
    for seq in group_a:
        sched.finish(seq, FinishReason.STOP)
    plan = step(sched)
    assert len(plan.released) == 2
    assert prefilled_ids(plan) == ["B/0", "B/1", "B/2", "C/0"]


def test_add_rejects_malformed_requests():
    sched = Scheduler(config(max_running=2))
    with pytest.raises(ValueError, match="at least one token"):
        sched.add(make("A", 0))
    with pytest.raises(ValueError, match="max_running"):
        sched.add(make("A", 2, n=3))
    sched.add(make("A", 2))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(make("A", 2))
    assert sched.num_waiting == 1


def _abort_and_check(sched: Scheduler, seqs: list[Sequence], successor: str) -> None:
    """Abort `seqs`' request: the next plan releases it once and admits `successor`."""
    victim = seqs[0].request_id
    sched.abort(victim)
    plan = step(sched)
    assert plan.released == seqs
    assert all(s.finish_reason is FinishReason.ABORT and s.is_finished for s in seqs)
    assert successor in {c.seq.request_id for c in plan.prefills}
    assert all(s not in plan.decodes for s in seqs)
    sched.abort(victim)  # a late cancel is a no-op
    for _ in range(3):
        later = step(sched)
        assert not any(s in later.released or s in later.decodes for s in seqs)


def test_abort_while_waiting():
    sched = Scheduler(config(max_running=1))
    add(sched, "blocker", 2, max_tokens=2)
    victim = add(sched, "victim", 2)[0]
    add(sched, "next", 2)
    step(sched)
    sched.abort("victim")
    plan = step(sched)  # blocker finishes by LENGTH this step
    assert plan.released == [victim] and victim.finish_reason is FinishReason.ABORT
    plan = step(sched)
    assert prefilled_ids(plan) == ["next/0"]
    assert victim.output_ids == []


def test_abort_mid_prefill():
    sched = Scheduler(config(max_running=1, max_batched_tokens=8, prefill_chunk=8))
    victim = add(sched, "victim", 30)
    add(sched, "next", 3)
    step(sched)
    assert victim[0].status is SequenceStatus.PREFILLING
    _abort_and_check(sched, victim, "next")


def test_abort_while_decoding_a_group():
    sched = Scheduler(config(max_running=2))
    victim = add(sched, "victim", 3, n=2, max_tokens=20)
    add(sched, "next", 3)
    step(sched)
    step(sched)
    assert all(s.status is SequenceStatus.DECODING for s in victim)
    _abort_and_check(sched, victim, "next")


def test_abort_between_schedule_and_update_drops_the_token():
    sched = Scheduler(config())
    seq = add(sched, "A", 2)[0]
    step(sched)
    plan = sched.schedule()
    sched.abort("A")
    assert sched.update(plan, {seq.seq_id: 7}) == []
    assert seq.output_ids == [100]
    assert step(sched).released == [seq]
    assert not sched.has_work


def test_max_tokens_finishes_with_length():
    sched = Scheduler(config())
    seq = add(sched, "A", 4, max_tokens=3)[0]
    for _ in range(3):
        assert step(sched).released == []
        assert seq.num_computed == seq.num_tokens - 1
    assert seq.output_ids == [100, 101, 102]
    assert seq.finish_reason is FinishReason.LENGTH
    plan = step(sched)
    assert plan.released == [seq] and not plan.decodes
    assert not sched.has_work


@pytest.mark.parametrize(("cached", "expected_start"), [(5, 4), (9, 4), (3, 3)])
def test_cached_prefix_skips_prefill_but_keeps_last_token(cached, expected_start):
    sched = Scheduler(config())
    seq = add(sched, "A", 5, cached=cached)[0]
    assert seq.num_cached == seq.num_computed == expected_start
    plan = step(sched)
    assert [(c.start, c.end) for c in plan.prefills] == [(expected_start, 5)]
    assert seq.status is SequenceStatus.DECODING and seq.output_ids == [100]


def test_protocol_misuse_is_caught():
    sched = Scheduler(config())
    sched.add(make("A", 2))
    plan = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    with pytest.raises(KeyError, match="A/0"):
        sched.update(plan, {})


def test_failed_step_can_be_finished_with_error():
    sched = Scheduler(config())
    sched.add(make("A", 2))
    plan = sched.schedule()
    for chunk in plan.prefills:
        sched.finish(chunk.seq, FinishReason.ERROR)
    assert sched.update(plan, {}) == []
    assert step(sched).released[0].finish_reason is FinishReason.ERROR


@pytest.mark.parametrize(
    "field", ["max_running", "max_batched_tokens", "max_waiting", "prefill_chunk", "max_model_len"]
)
@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_config_rejects_non_positive_ints(field, bad):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: bad})


def test_config_chunk_must_fit_budget():
    with pytest.raises(ValueError, match="prefill_chunk"):
        SchedulerConfig(max_batched_tokens=100, prefill_chunk=101)
    SchedulerConfig(max_batched_tokens=100, prefill_chunk=100)


# ----- the KV byte budget ------------------------------------------------------------------


def budgeted(max_bytes: int, **kw) -> Scheduler:
    """A scheduler whose rows cost 1 byte per position, in blocks of 16 (one full layer)."""
    from moeserve.models.cache import CacheLayout, Latent
    from moeserve.server.engine.scheduler import KVBudget

    layout = CacheLayout([Latent(((1, 1),))], 1)  # 1 byte per position
    return Scheduler(config(**kw), KVBudget(layout, max_bytes))


def held(sched: Scheduler) -> int:
    return sum(sched.budget.row(s.num_computed) for s in sched._running)


def test_request_that_never_fits_names_the_limit():
    from moeserve.server.engine.scheduler import KVBudgetError

    sched = budgeted(64)
    with pytest.raises(KVBudgetError, match="kv_cache_max_bytes"):
        add(sched, "big", 40, max_tokens=40)  # 80 positions = 5 blocks of 16 > 64 bytes
    add(sched, "fits", 40, max_tokens=24)  # 64 positions: exactly the budget
    assert sched.num_waiting == 1


def test_decode_growth_preempts_the_newest_and_it_resumes_unchanged():
    sched = budgeted(96, max_running=4, max_batched_tokens=64, prefill_chunk=32)
    old = add(sched, "old", 30, max_tokens=30)[0]
    new = add(sched, "new", 30, max_tokens=30)[0]
    preempted: list[str] = []
    outputs_at_preemption: dict[str, list[int]] = {}
    for _ in range(200):
        if not sched.has_work:
            break
        plan = step(sched)
        assert held(sched) <= 96  # what the runner holds after the step
        for seq in plan.preempted:
            preempted.append(seq.seq_id)
            outputs_at_preemption[seq.seq_id] = list(seq.output_ids)
            assert seq.num_computed == 0 and seq.status is SequenceStatus.WAITING
    assert preempted and preempted[0] == "new/0"  # the newest goes first
    assert sched.preemptions == len(preempted)
    # Nothing was lost: both completed all their tokens, in order, as fake_token numbers them.
    for seq in (old, new):
        assert seq.finish_reason is FinishReason.LENGTH
        assert seq.output_ids == [100 + i for i in range(30)]
    # The resumed prefill recomputed prompt + output but the last token, and sampled nothing.
    assert outputs_at_preemption["new/0"]


def test_resumed_prefill_covers_the_output_and_samples_nothing():
    sched = budgeted(10**6)
    seq = add(sched, "r", 5, max_tokens=8)[0]
    step(sched)
    step(sched)
    assert seq.output_ids == [100, 101] and seq.num_computed == 6
    plan = StepPlan()
    sched._running.remove(seq)
    sched._preempt(seq, plan)
    plan = sched.schedule()
    (chunk,) = plan.prefills
    assert (chunk.start, chunk.end) == (0, 6) and chunk.is_last and not chunk.samples
    sched.update(plan, {})
    assert seq.status is SequenceStatus.DECODING and seq.output_ids == [100, 101]


def test_admission_waits_for_bytes_and_chunks_shrink_to_fit():
    sched = budgeted(64, max_running=4, max_batched_tokens=64, prefill_chunk=32)
    first = add(sched, "a", 40, max_tokens=8)[0]
    plan = sched.schedule()
    assert [(c.start, c.end) for c in plan.prefills] == [(0, 32)]
    sched.update(plan, {})
    add(sched, "b", 40, max_tokens=8)
    plan = sched.schedule()  # a's rest (8) fits; b's first chunk (32) would exceed 64 bytes
    assert prefilled_ids(plan) == ["a/0"] and sched.num_waiting == 1
    sched.update(plan, {"a/0": 100})
    assert first.status is SequenceStatus.DECODING
