"""The step cost model, and the scheduler's time-limited prefill built on it.

Steps are "measured" from a known cost formula (plus noise and spikes where the test says
so), so the fitted coefficients and the chunk sizes the scheduler picks can be checked
against that formula. No real timing anywhere.
"""

from __future__ import annotations

import random

import pytest

from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import (
    MIN_TIMED_CHUNK,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from moeserve.server.engine.sequence import Sequence, check_stop
from moeserve.server.engine.step_cost import StepCostModel, StepShape

# a + b rows + c positions/1024 + d tokens + e pairs/1024, in seconds
TRUE = (0.010, 0.002, 0.004, 0.0005, 0.0001)


def true_cost(shape: StepShape) -> float:
    return sum(c * x for c, x in zip(TRUE, shape.features()))


def random_shape(rng: random.Random, prefill: bool) -> StepShape:
    rows = rng.randint(1, 16)
    positions = rows * rng.randint(50, 400)
    tokens = rng.randint(1, 512) if prefill else 0
    start = rng.randint(0, 1000)
    return StepShape(rows, positions, tokens, tokens * (start + tokens))


def test_fit_recovers_the_cost_formula_despite_spikes() -> None:
    rng = random.Random(0)
    model = StepCostModel()
    for i in range(200):
        shape = random_shape(rng, prefill=i % 4 == 0)
        seconds = true_cost(shape) * rng.uniform(0.97, 1.03)
        if i % 17 == 0:
            seconds *= 5.0  # another process took the CPU
        model.observe(shape, seconds)
    for _ in range(20):
        shape = random_shape(rng, prefill=True)
        assert model.predict(shape) == pytest.approx(true_cost(shape), rel=0.08)


def test_coefficients_stay_non_negative() -> None:
    model = StepCostModel()
    rng = random.Random(1)
    for i in range(64):  # decode cost falls with rows: nonsense a fit must not extrapolate
        rows = rng.randint(1, 16)
        prefill = 32 if i % 2 else 0
        model.observe(StepShape(rows, rows * 100, prefill, prefill * 64), 0.05 - 0.001 * rows)
    assert model.coef is not None and all(c >= 0.0 for c in model.coef[1:])


def test_knows_prefill_only_after_both_kinds_of_step() -> None:
    model = StepCostModel()
    assert model.predict(StepShape(1, 10)) is None and not model.knows_prefill
    for rows in range(1, 9):
        model.observe(StepShape(rows, rows * 100), true_cost(StepShape(rows, rows * 100)))
    assert not model.knows_prefill
    shape = StepShape(2, 200, 64, 64 * 64)
    model.observe(shape, true_cost(shape))
    assert model.knows_prefill


def test_prefill_within_is_the_longest_chunk_that_fits() -> None:
    model = StepCostModel()
    model.coef = list(TRUE)
    d, e = TRUE[3], TRUE[4] / 1024

    def cost(n: int, start: int) -> float:
        return d * n + e * n * (start + n)

    for seconds, start in ((0.05, 0), (0.05, 3000), (0.2, 100), (0.0, 0)):
        n = model.prefill_within(seconds, start, 512)
        assert n == max((k for k in range(513) if cost(k, start) <= seconds), default=0)


# ----- the scheduler with a learned cost -------------------------------------------------------


def make_seq(rid: str, prompt_len: int, max_tokens: int = 64) -> list[Sequence]:
    return [Sequence(rid, 0, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))]


def run_step(sched: Scheduler) -> tuple[StepPlan, float]:
    """A fake runner whose step takes exactly ``true_cost``; the scheduler observes it."""
    plan = sched.schedule()
    sampled = {c.seq.seq_id: 7 for c in plan.prefills if c.is_last}
    sampled.update({s.seq_id: 7 for s in plan.decodes})
    seconds = true_cost(plan.shape)
    sched.observe(plan, seconds)
    for seq in sched.update(plan, sampled):
        if (reason := check_stop(seq)) is not None:
            sched.finish(seq, reason)
    return plan, seconds


def warmed(ratio: float) -> Scheduler:
    """A scheduler that has run a few prompts and decodes, so its cost model is fitted."""
    cfg = SchedulerConfig(
        max_running=32, max_batched_tokens=2048, prefill_chunk=512, prefill_step_ratio=ratio
    )
    sched = Scheduler(cfg)
    for i in range(8):  # arrivals one step apart, short and long (chunks at many starts)
        sched.add(make_seq(f"w{i}", 40 + 170 * i, max_tokens=6 + i))
        run_step(sched)
    while sched.has_work:
        run_step(sched)
    return sched


def decoding(sched: Scheduler, streams: int) -> None:
    for i in range(streams):
        sched.add(make_seq(f"s{i}", 40, max_tokens=500))
    for _ in range(3):
        run_step(sched)


def test_steps_with_prefill_stay_within_the_ratio_of_decode_alone() -> None:
    sched = warmed(ratio=2.0)
    assert sched.cost.knows_prefill
    decoding(sched, 8)
    long = make_seq("long", 1500)
    sched.add(long)
    chunks = []
    while not long[0].output_ids:
        plan, seconds = run_step(sched)
        decode_alone = true_cost(StepShape(plan.shape.decode_rows, plan.shape.decode_positions))
        if plan.prefills:
            chunks.append(plan.prefills[0].end - plan.prefills[0].start)
            assert seconds <= 2.0 * decode_alone * 1.05 or chunks[-1] == MIN_TIMED_CHUNK
    assert len(chunks) > 3  # split over many steps, not 512-token chunks
    assert all(c < 512 for c in chunks)


def test_without_decodes_prefill_takes_the_whole_chunk() -> None:
    sched = warmed(ratio=2.0)
    sched.add(make_seq("alone", 1500))
    plan, _ = run_step(sched)
    assert [c.end - c.start for c in plan.prefills] == [512]


def test_ratio_zero_keeps_the_token_budget() -> None:
    sched = warmed(ratio=0)
    decoding(sched, 8)
    sched.add(make_seq("long", 1500))
    plan, _ = run_step(sched)
    assert [c.end - c.start for c in plan.prefills] == [512]


def test_a_tiny_budget_still_makes_progress() -> None:
    sched = warmed(ratio=1.0)  # no time at all beside decodes: the floor keeps prompts moving
    decoding(sched, 8)
    seqs = make_seq("long", 100)
    sched.add(seqs)
    for _ in range(100 // MIN_TIMED_CHUNK + 2):
        run_step(sched)
    assert seqs[0].output_ids  # its prefill finished
