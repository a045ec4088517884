"""Partial-selection top_k / top_p / min_p against the full-sort reference.

The reference is the same module forced to sort the whole row (``candidates = V``); a
plain-Python statement of the nucleus rule checks that reference on well-separated logits.
Crafted rows cover ties at the cut, flat rows (nucleus wider than the candidates: the full
sort must take over), -inf (masked) tokens, and mixes of top_k, top_p, min_p and greedy rows.
"""

from __future__ import annotations

import math
import random

import mlx.core as mx
import pytest

from moeserve.server.engine.sampling import Sampler, SamplerRow, SamplingParams
from moeserve.server.engine.truncation import cut

V = 64
FEW = 6  # candidates per row in the partial runs: far fewer than V, so the shortcuts run


def kept_sets(logits: mx.array, params: list[SamplingParams], candidates: int) -> list[set]:
    """Token ids each row keeps, read from the candidate view when there is one."""
    c = cut(logits, params, [True] * len(params), candidates)
    if c.ids is not None:
        ids, kept = c.ids.tolist(), c.kept.tolist()
        return [{t for t, k in zip(r, m) if k} for r, m in zip(ids, kept)]
    out = c.apply(logits).tolist()
    return [{t for t, x in enumerate(r) if x > -math.inf} for r in out]


def reference_nucleus(row: list[float], top_p: float) -> set[int]:
    """The smallest prefix of the descending order whose mass reaches top_p, plus ties."""
    m = max(row)
    probs = [math.exp(x - m) for x in row]
    z = sum(probs)
    order = sorted(range(len(row)), key=lambda t: -row[t])
    mass, kept = 0.0, []
    for t in order:
        if mass >= top_p:
            break
        kept.append(t)
        mass += probs[t] / z
    last = row[kept[-1]]
    return {t for t in range(len(row)) if row[t] >= last}


def peaked(seed: int, n: int = V) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(0.0, 1.0) * (8.0 if i < 4 else 1.0) for i in range(n)]


CASES = {
    "peaked": [peaked(s) for s in range(4)],
    "ties_at_cut": [[5.0, 4.0] + [3.0] * 12 + [-2.0] * (V - 14)] * 2,
    "flat": [[0.0] * V, [1.0] * (V // 2) + [0.5] * (V // 2)],
    "slope": [[-0.02 * i for i in range(V)], [-0.3 * i for i in range(V)]],
    "masked": [[2.0, 1.0, 0.5] + [-math.inf] * (V - 3), [-math.inf] * (V - 1) + [0.0]],
}
PARAMS = [
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.5),
    SamplingParams(top_k=3),
    SamplingParams(top_k=4, top_p=0.8),
    SamplingParams(top_p=0.95, min_p=0.05),
    SamplingParams(top_p=0.999),
]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_partial_keeps_exactly_what_the_full_sort_keeps(case: str, p: SamplingParams) -> None:
    logits = mx.array(CASES[case])
    params = [p] * logits.shape[0]
    assert kept_sets(logits, params, FEW) == kept_sets(logits, params, V)


def test_full_sort_reference_is_the_nucleus_rule() -> None:
    rows = CASES["peaked"] + CASES["ties_at_cut"]
    rows = mx.array(rows).tolist()  # through float32, as MLX sees them
    for top_p in (0.3, 0.9):
        got = kept_sets(mx.array(rows), [SamplingParams(top_p=top_p)] * len(rows), V)
        assert got == [reference_nucleus(r, top_p) for r in rows]


def test_mixed_batch_matches_row_by_row() -> None:
    logits = mx.array(CASES["peaked"] + CASES["flat"] + CASES["ties_at_cut"])
    params = [PARAMS[i % len(PARAMS)] for i in range(logits.shape[0])]
    together = kept_sets(logits, params, FEW)
    alone = [kept_sets(logits[i : i + 1], [p], V)[0] for i, p in enumerate(params)]
    assert together == alone


def test_candidate_view_is_used_only_when_exact() -> None:
    peaked_rows = mx.array(CASES["peaked"])
    params = [SamplingParams(top_p=0.5)] * peaked_rows.shape[0]
    assert cut(peaked_rows, params, [True] * 4, FEW).ids is not None
    flat = mx.array(CASES["flat"])
    assert cut(flat, params[:2], [True] * 2, FEW).ids is None  # nucleus wider: full sort
    # A row drawing without rank truncation needs the whole vocabulary.
    mixed = [SamplingParams(top_p=0.5), SamplingParams(min_p=0.1)]
    assert cut(peaked_rows[:2], mixed, [True, True], FEW).ids is None
    # ... unless its draw is discarded (a greedy row).
    assert cut(peaked_rows[:2], mixed, [True, False], FEW).ids is not None


@pytest.mark.parametrize("truncation", [{"top_p": 0.9}, {"top_k": 5, "top_p": 0.7}])
def test_seeded_samples_equal_the_full_sort_path(truncation: dict) -> None:
    partial, full = Sampler(candidates=FEW), Sampler(candidates=V)
    for step in range(12):
        logits = mx.array([peaked(100 + step), [0.0] * V, peaked(200 + step)])
        rows = [
            SamplerRow(SamplingParams(seed=s, temperature=0.8, **truncation), step=step)
            for s in (1, 2, 3)
        ]
        assert partial(logits, rows).tokens.tolist() == full(logits, rows).tokens.tolist()


def test_unseeded_draws_stay_in_the_nucleus_and_cover_it() -> None:
    row = mx.array([peaked(7)]).tolist()[0]
    nucleus = reference_nucleus(row, 0.9)
    mx.random.seed(3)
    rows = [SamplerRow(SamplingParams(top_p=0.9)) for _ in range(2000)]
    drawn = Sampler(candidates=FEW)(mx.array([row] * 2000), rows).tokens.tolist()
    assert set(drawn) == nucleus


def test_greedy_rows_are_unchanged_beside_truncated_ones() -> None:
    logits = mx.array(CASES["ties_at_cut"][:1] + CASES["peaked"][:1])
    rows = [SamplerRow(SamplingParams(temperature=0.0)), SamplerRow(SamplingParams(top_p=0.5))]
    out = Sampler(candidates=FEW)(logits, rows).tokens.tolist()
    assert out[0] == 0  # argmax, lowest id among ties


def test_real_vocabulary_rows_match_the_full_sort() -> None:
    # 151,936 tokens (Qwen3's vocabulary): a peaked row, a flatter one, and a row of ties.
    n = 151_936
    mx.random.seed(11)
    base = mx.random.normal((3, n))
    logits = mx.concatenate([base[:1] * 4.0, base[1:2] * 1.5, mx.round(base[2:] * 2.0)], axis=0)
    for p in (SamplingParams(top_p=0.9), SamplingParams(top_p=0.9, top_k=2000)):
        params = [p] * 3
        full = cut(logits, params, [True] * 3, n)
        partial = cut(logits, params, [True] * 3, 1024)
        assert partial.threshold.tolist() == full.threshold.tolist()


def test_a_peaked_row_skips_the_whole_row_normaliser(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its tail is so far below that the bounds on the normaliser decide the nucleus; a flat
    # row cannot be decided that way and pays the pass over its row (and only its row).
    from moeserve.server.engine import truncation

    seen: list[int] = []
    real = truncation._row_mass

    def counting(scaled: mx.array, top: mx.array) -> mx.array:
        seen.append(scaled.shape[0])
        return real(scaled, top)

    monkeypatch.setattr(truncation, "_row_mass", counting)
    n = 20_000
    mx.random.seed(5)
    tail = mx.random.normal((2, n)) - 30.0
    head = mx.array([[8.0, 7.0, 6.5, 5.0], [0.0, 0.0, 0.0, 0.0]])
    logits = mx.concatenate([head, tail], axis=1)
    logits[1] = mx.random.normal((n + 4,)) * 0.5  # flat
    params = [SamplingParams(top_p=0.9)] * 2
    cut(logits[:1], params[:1], [True], 64)
    assert seen == []  # the peaked row alone: no pass over its row
    partial = cut(logits, params, [True, True], 64)
    assert seen and all(rows == 1 for rows in seen)  # only the flat row's
    assert partial.threshold.tolist() == cut(logits, params, [True, True], n + 4).threshold.tolist()


def _flat_rows(n: int, seed: int) -> mx.array:
    mx.random.seed(seed)
    return mx.random.normal((3, n)) * 0.5  # nuclei of thousands of tokens, far beyond FEW


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_wide_nuclei_are_drawn_without_sorting_as_the_full_sort_draws(top_p: float) -> None:
    # Seeded rows: the same noise either way, so the draws must be equal token for token;
    # unrestricted, many of these draws fall outside the nucleus, so the search has work.
    n = 4096
    logits = _flat_rows(n, 21)
    partial, full = Sampler(candidates=FEW), Sampler(candidates=n)
    outside = 0
    for step in range(10):
        rows = [SamplerRow(SamplingParams(seed=s, top_p=top_p), step=step) for s in (4, 5, 6)]
        got = partial(logits, rows).tokens.tolist()
        assert got == full(logits, rows).tokens.tolist()
        free = [SamplerRow(SamplingParams(seed=s), step=step) for s in (4, 5, 6)]
        outside += sum(a != b for a, b in zip(got, Sampler()(logits, free).tokens.tolist()))
    assert outside > 0


def test_wide_nucleus_draws_stay_in_it_and_cover_it() -> None:
    row = _flat_rows(200, 8)[0].tolist()
    nucleus = reference_nucleus(row, 0.5)
    mx.random.seed(4)
    rows = [SamplerRow(SamplingParams(top_p=0.5)) for _ in range(3000)]
    drawn = Sampler(candidates=FEW)(mx.array([row] * 3000), rows).tokens.tolist()
    assert set(drawn) == nucleus


def test_a_token_at_the_edge_of_the_nucleus_is_left_to_the_full_sort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ten tokens at 1.0 and the rest at 0.0; top_p is the ten's own mass, so the mass above
    # any 0.0 token equals top_p up to rounding: too close to decide without the sorted sums.
    from moeserve.server.engine import truncation

    row = [1.0] * 10 + [0.0] * 90
    probs = mx.softmax(mx.array(row)).tolist()
    top_p = sum(probs[:10])
    undecided: list[int] = []
    real = truncation.nucleus_argmax

    def recording(*args):
        chosen, left = real(*args)
        undecided.extend(left)
        return chosen, left

    monkeypatch.setattr(truncation, "nucleus_argmax", recording)
    logits = mx.array([row] * 4)
    partial, full = Sampler(candidates=FEW), Sampler(candidates=100)
    for step in range(8):
        rows = [SamplerRow(SamplingParams(seed=s, top_p=top_p), step=step) for s in range(4)]
        assert partial(logits, rows).tokens.tolist() == full(logits, rows).tokens.tolist()
    assert undecided


def test_nucleus_argmax_looks_above_each_rejected_token() -> None:
    from moeserve.server.engine.truncation import nucleus_argmax

    # One row, so every round reads the whole batch; the noise favours five tokens outside
    # the nucleus, the farthest most, so it takes six rounds to climb into it.
    row = [-0.1 * i for i in range(50)]
    nucleus = reference_nucleus(mx.array(row).tolist(), 0.3)
    lured = sorted(set(range(50)) - nucleus)[-5:]
    noise = [0.5 * i if i in lured else 0.0 for i in range(50)]
    scores = mx.array([[x + n for x, n in zip(row, noise)]])
    chosen, undecided = nucleus_argmax(scores, mx.array([row]), [0.3])
    best = max(nucleus, key=lambda t: row[t] + noise[t])
    assert undecided == [] and chosen.tolist() == [best]


def test_a_mixed_batch_with_wide_nuclei_draws_as_the_full_sort_does() -> None:
    # Deferred rows (wide top_p nuclei) beside greedy, top_k and min_p rows: the deferred
    # draw must leave the other rows' tokens alone, and every row must match the full sort.
    n = 2048
    flat = _flat_rows(n, 31)
    logits = mx.concatenate([flat[:2], mx.array([peaked(9, n)]), flat[2:]], axis=0)
    params = [
        SamplingParams(seed=1, top_p=0.9),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=2, top_k=40, top_p=0.8),
        SamplingParams(seed=3, top_p=0.7, min_p=0.2, temperature=1.3),
    ]
    partial, full = Sampler(candidates=FEW), Sampler(candidates=n)
    for step in range(6):
        rows = [SamplerRow(p, step=step) for p in params]
        assert partial(logits, rows).tokens.tolist() == full(logits, rows).tokens.tolist()
