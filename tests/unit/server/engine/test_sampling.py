"""Tests for the batched sampler: filters, penalties, seeds, logprobs and the host conversion.

Expected values come from plain-Python re-statements of the published formulas (OpenAI penalties,
HF repetition penalty, log_softmax), never from the sampler itself. Distribution tests fix
MLX's global seed and draw thousands of rows in one batched call, so they are fast and stable.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import mlx.core as mx
import pytest

from moeserve.server.engine.sampling import (
    MAX_TOP_LOGPROBS,
    SampleOutput,
    Sampler,
    SamplerRow,
    SamplingParams,
    row_key,
)

V = 50
SAMPLER = Sampler()
Logits = list[list[float]]


def rows_of(n: int, **params: object) -> list[SamplerRow]:
    return [SamplerRow(SamplingParams(**params)) for _ in range(n)]


def random_logits(b: int, seed: int = 0) -> Logits:
    """Normal(0, 3) logits, rounded through float32 so references see what MLX sees."""
    rng = random.Random(seed)
    return mx.array([[rng.gauss(0.0, 3.0) for _ in range(V)] for _ in range(b)]).tolist()


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def ranked(row: list[float]) -> list[int]:
    return sorted(range(len(row)), key=lambda t: -row[t])


def log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def sample(logits: Logits, rows: list[SamplerRow], mask: mx.array | None = None) -> list[int]:
    return SAMPLER(mx.array(logits), rows, mask).tokens.tolist()


def draw(logits_row: list[float], n: int, seed: int = 0, **params: object) -> list[int]:
    """Draw n samples of one distribution, as one batch of n identical rows."""
    mx.random.seed(seed)
    return sample([logits_row] * n, rows_of(n, **params))


def freq(tokens: list[int]) -> list[float]:
    counts = Counter(tokens)
    return [counts[t] / len(tokens) for t in range(V)]


# Probabilities of tokens 0..4; the other 45 share what is left. Sorted mass before each of
# the first five: 0, .4, .65, .80, .90 -- every threshold used below sits well between them.
HEAD = [0.40, 0.25, 0.15, 0.10, 0.05]


def hand_built() -> list[float]:
    rest = (1.0 - sum(HEAD)) / (V - len(HEAD))
    return [math.log(p) for p in HEAD] + [math.log(rest)] * (V - len(HEAD))


def test_greedy_equals_argmax_even_beside_sampled_rows() -> None:
    # Flat logits (sd 0.3) so that any Gumbel noise leaking into a greedy row would show.
    n = 300
    logits = [[x * 0.1 for x in row] for row in random_logits(n)]
    rows = rows_of(n, temperature=0.0)
    for i in range(0, n, 3):
        rows[i] = SamplerRow(SamplingParams(temperature=1.5, top_p=0.9, seed=i % 2 or None))
    rows[1] = SamplerRow(SamplingParams(temperature=0.0, seed=5))  # a seed changes nothing
    mx.random.seed(0)
    tokens = sample(logits, rows)
    greedy = [i for i in range(n) if i % 3]
    assert [tokens[i] for i in greedy] == [argmax(logits[i]) for i in greedy]


def test_small_temperature_approaches_argmax() -> None:
    # Logits 0.5 apart: at T=1e-3 the gap is 500 nats, beyond any Gumbel draw.
    rng = random.Random(1)
    logits = [[0.5 * t for t in rng.sample(range(V), V)] for _ in range(64)]
    mx.random.seed(1)
    assert sample(logits, rows_of(64, temperature=1e-3)) == [argmax(r) for r in logits]


def test_plain_sampling_follows_softmax_of_scaled_logits() -> None:
    temperature = 2.0
    got = freq(draw(hand_built(), 6000, seed=2, temperature=temperature))
    expected = [math.exp(x) for x in log_softmax([x / temperature for x in hand_built()])]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 0.03


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(500, seed=3)
    mx.random.seed(3)
    tokens = sample(logits, rows_of(500, top_k=1, temperature=1.5))
    assert tokens == [argmax(r) for r in logits]


def test_top_k_keeps_only_k_best() -> None:
    assert set(draw(hand_built(), 4000, seed=4, top_k=3)) == {0, 1, 2}


@pytest.mark.parametrize(("top_p", "nucleus"), [(0.3, 1), (0.6, 2), (0.75, 3), (0.85, 4)])
def test_top_p_samples_exactly_the_nucleus(top_p: float, nucleus: int) -> None:
    tokens = draw(hand_built(), 4000, seed=5, top_p=top_p)
    assert set(tokens) == set(range(nucleus))
    mass = sum(HEAD[:nucleus])
    got = freq(tokens)
    assert max(abs(got[t] - HEAD[t] / mass) for t in range(nucleus)) < 0.03


def test_top_p_applies_after_top_k() -> None:
    # top_k=2 renormalises to .4/.65 and .25/.65; top_p=0.5 then keeps only the first.
    assert set(draw(hand_built(), 2000, seed=6, top_k=2, top_p=0.5)) == {0}
    # The same beside a top_p-only row, which makes the sampler sort the whole vocabulary.
    n = 2000
    rows = [SamplerRow(SamplingParams(top_k=2, top_p=0.5)) for _ in range(n)]
    rows[::2] = rows_of(n // 2, top_p=0.75)
    mx.random.seed(6)
    tokens = sample([hand_built()] * n, rows)
    assert set(tokens[1::2]) == {0}
    assert set(tokens[::2]) == {0, 1, 2}


def test_rows_truncate_independently() -> None:
    n = 3000
    params = [
        SamplingParams(top_k=2),
        SamplingParams(top_k=4),
        SamplingParams(),  # beside top_k rows it must still reach the whole vocabulary
        SamplingParams(min_p=0.3),
    ]
    rows = [SamplerRow(params[i % 4]) for i in range(n)]
    mx.random.seed(16)
    tokens = sample([hand_built()] * n, rows)
    assert set(tokens[0::4]) == {0, 1}
    assert set(tokens[1::4]) == {0, 1, 2, 3}
    assert len(set(tokens[2::4])) > 10
    assert set(tokens[3::4]) == {0, 1, 2}


@pytest.mark.parametrize(("min_p", "kept"), [(0.5, 2), (0.3, 3), (0.2, 4)])
def test_min_p_drops_tokens_below_fraction_of_best(min_p: float, kept: int) -> None:
    # Kept: p >= min_p * 0.40, i.e. .20, .12 and .08 as thresholds.
    assert set(draw(hand_built(), 4000, seed=7, min_p=min_p)) == set(range(kept))


def test_logit_bias_forces_and_forbids() -> None:
    logits = random_logits(1, seed=8)[0]
    assert set(draw(logits, 200, seed=8, logit_bias={17: 100.0})) == {17}
    best, second = ranked(logits)[:2]
    rows = [SamplerRow(SamplingParams(temperature=0.0, logit_bias={best: -100.0}))]
    assert sample([logits], rows) == [second]


def test_banned_ids_are_never_sampled() -> None:
    n = 3000
    banned = frozenset({0, 1, 2})  # 80% of the mass
    rows = [SamplerRow(SamplingParams(), banned_ids=banned) for _ in range(n)]
    rows[0] = SamplerRow(SamplingParams(temperature=0.0), banned_ids=banned)
    mx.random.seed(9)
    tokens = sample([hand_built()] * n, rows)
    assert not set(tokens) & banned
    assert tokens[0] == 3


def test_banned_ids_outside_the_vocabulary_are_ignored() -> None:
    # The engine bans user stop_token_ids too; one the model cannot emit must not fail a step.
    logits = random_logits(1, seed=17)
    rows = [SamplerRow(SamplingParams(temperature=0.0), banned_ids=frozenset({-1, V, V + 9}))]
    assert sample(logits, rows) == [argmax(logits[0])]


def test_banned_overrides_a_positive_bias() -> None:
    logits = random_logits(1)
    rows = [
        SamplerRow(
            SamplingParams(temperature=0.0, logit_bias={5: 100.0}), banned_ids=frozenset({5})
        )
    ]
    assert SAMPLER.process_logits(mx.array(logits), rows)[0, 5].item() == -math.inf
    assert sample(logits, rows) != [5]


def test_allowed_mask_is_respected() -> None:
    n = 2000
    allowed = [[t in (3, 10, 40) for t in range(V)] for _ in range(n)]
    allowed[0] = [t == 45 for t in range(V)]
    rows = rows_of(n)
    rows[1] = SamplerRow(SamplingParams(temperature=0.0))
    mx.random.seed(10)
    tokens = sample([hand_built()] * n, rows, mx.array(allowed))
    assert tokens[0] == 45
    assert tokens[1] == 3  # the best allowed token
    assert set(tokens[1:]) == {3, 10, 40}


def test_presence_and_frequency_follow_openai_formula() -> None:
    logits = random_logits(2, seed=11)
    penalties = [(0.7, 0.3), (-0.5, 1.0)]
    outputs = [[4, 4, 4, 9, 12, 12], [7]]
    rows = [
        SamplerRow(
            SamplingParams(presence_penalty=pres, frequency_penalty=freq_),
            output_ids=out,
            prompt_ids=[1, 2, 3, 4],  # the prompt does not count for OpenAI penalties
        )
        for (pres, freq_), out in zip(penalties, outputs)
    ]
    got = SAMPLER.process_logits(mx.array(logits), rows).tolist()
    for i, ((pres, freq_), out) in enumerate(zip(penalties, outputs)):
        for t in range(V):
            count = out.count(t)
            expected = logits[i][t] - (pres * (count > 0) + freq_ * count)
            assert got[i][t] == pytest.approx(expected, abs=1e-5)


def test_repetition_penalty_over_prompt_and_output() -> None:
    logits = random_logits(1, seed=12)
    logits[0][3], logits[0][8] = 2.0, -2.0  # one seen token of each sign
    prompt, output, penalty = [3, 8, 20], [8, 31, 31], 1.5
    rows = [SamplerRow(SamplingParams(repetition_penalty=penalty), output, prompt)]
    got = SAMPLER.process_logits(mx.array(logits), rows).tolist()[0]
    for t, x in enumerate(logits[0]):
        seen = t in prompt or t in output
        expected = (x / penalty if x > 0 else x * penalty) if seen else x
        assert got[t] == pytest.approx(expected, abs=1e-6)
    assert got[3] == pytest.approx(2.0 / 1.5) and got[8] == pytest.approx(-3.0)


def seeded_sequence(
    seed: int, steps: int, others: int, position: int, truncation: dict[str, float]
) -> list[int]:
    """Sample `steps` tokens of one seeded row placed among `others` unrelated rows."""
    tokens = []
    mx.random.seed(100 + others + position)  # the global stream differs between layouts
    extra = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.3, temperature=0.7),
        SamplingParams(seed=seed + 1, top_k=5),
    ]
    for step in range(steps):
        target = SamplerRow(SamplingParams(seed=seed, temperature=0.9, **truncation), step=step)
        rows = [SamplerRow(extra[j % len(extra)], step=step) for j in range(others)]
        rows.insert(position, target)
        logits = random_logits(others + 1, seed=1000 + step + 17 * others)
        logits[position] = random_logits(1, seed=step)[0]  # the target's logits are fixed
        tokens.append(sample(logits, rows)[position])
    return tokens


@pytest.mark.parametrize(
    "truncation",
    [{}, {"top_p": 0.95}, {"top_k": 10, "top_p": 0.9, "min_p": 0.02}],
)
def test_seeded_row_is_reproducible_in_any_batch(truncation: dict[str, float]) -> None:
    # Neighbours include plain, greedy, seeded and top_p-only rows; the last one switches the
    # truncation from the partial sort (best top_k only) to the full sort.
    def run(seed: int, others: int, position: int) -> list[int]:
        return seeded_sequence(seed, 10, others, position, truncation)

    alone = run(42, others=0, position=0)
    assert run(42, others=2, position=1) == alone
    assert run(42, others=4, position=4) == alone
    assert run(42, others=7, position=0) == alone
    # And the seed matters: another seed gives another sequence (50 tokens, 10 steps).
    assert run(43, others=0, position=0) != alone


def test_row_key_depends_on_seed_and_step() -> None:
    keys = {tuple(row_key(s, t).tolist()) for s in (0, 1, 2**63, -1) for t in (0, 1, 2)}
    assert len(keys) == 12
    assert row_key(5, 3).tolist() == row_key(5, 3).tolist()


def test_logprobs_are_raw_log_softmax_of_chosen_token() -> None:
    logits = random_logits(4, seed=13)
    rows = [
        SamplerRow(SamplingParams(logprobs=True)),
        SamplerRow(SamplingParams(logprobs=True, temperature=0.0, logit_bias={2: 50.0})),
        SamplerRow(SamplingParams(logprobs=True, top_k=3, presence_penalty=2.0), [1, 2]),
        SamplerRow(SamplingParams()),  # asks for nothing
    ]
    mx.random.seed(13)
    out = SAMPLER(mx.array(logits).astype(mx.bfloat16), rows)
    samples = out.to_lists(rows)
    as_bf16 = mx.array(logits).astype(mx.bfloat16).astype(mx.float32).tolist()
    for i, s in enumerate(samples[:3]):
        assert s.logprob == pytest.approx(log_softmax(as_bf16[i])[s.token], abs=1e-5)
    assert samples[1].token == 2  # the bias decided the token, not the reported logprob
    assert samples[3].logprob is None and samples[3].top == []


def test_top_logprobs_sorted_correct_and_cut_per_row() -> None:
    logits = random_logits(3, seed=14)
    rows = [
        SamplerRow(SamplingParams(logprobs=True, top_logprobs=5)),
        SamplerRow(SamplingParams(logprobs=True, top_logprobs=2)),
        SamplerRow(SamplingParams(logprobs=True)),
    ]
    out = SAMPLER(mx.array(logits), rows)
    assert out.top_ids is not None and out.top_ids.shape == (3, 5)
    for i, s in enumerate(out.to_lists(rows)):
        raw = log_softmax(logits[i])
        n = rows[i].params.top_logprobs
        assert [t for t, _ in s.top] == ranked(raw)[:n]
        assert [lp for _, lp in s.top] == pytest.approx([raw[t] for t, _ in s.top], abs=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(s.top, s.top[1:]))


def test_top_logprobs_capped_at_twenty() -> None:
    rows = [SamplerRow(SamplingParams(logprobs=True, top_logprobs=30))]
    out = SAMPLER(mx.array(random_logits(1)), rows)
    assert out.top_ids is not None and out.top_ids.shape == (1, MAX_TOP_LOGPROBS)
    assert len(out.to_lists(rows)[0].top) == MAX_TOP_LOGPROBS


def test_to_lists_syncs_once_and_returns_plain_python(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_eval = mx.eval

    def counting_eval(*arrays: mx.array) -> None:
        calls.append(len(arrays))
        real_eval(*arrays)

    rows = [SamplerRow(SamplingParams(logprobs=True, top_logprobs=3)) for _ in range(8)]
    out = SAMPLER(mx.array(random_logits(8)), rows)
    monkeypatch.setattr(mx, "eval", counting_eval)
    samples = out.to_lists(rows)
    assert calls == [4]  # one eval over tokens, logprobs, top ids and top logprobs
    assert all(type(s.token) is int and type(s.logprob) is float for s in samples)
    assert all(type(t) is int and type(lp) is float for s in samples for t, lp in s.top)


def test_to_lists_rejects_wrong_row_count() -> None:
    out = SampleOutput(tokens=mx.array([1, 2], dtype=mx.int32))
    with pytest.raises(ValueError, match="rows"):
        out.to_lists(rows_of(3))


def test_output_shapes_and_dtypes() -> None:
    out = SAMPLER(mx.array(random_logits(3)).astype(mx.float16), rows_of(3))
    assert out.tokens.shape == (3,) and out.tokens.dtype == mx.int32
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


@pytest.mark.parametrize(
    ("rows", "shape", "match"),
    [
        (rows_of(2), (3, V), "logits"),
        ([SamplerRow(SamplingParams(logit_bias={V: 1.0}))], (1, V), "logit_bias"),
        ([SamplerRow(SamplingParams(repetition_penalty=1.2), [V + 3])], (1, V), "prompt_ids"),
    ],
)
def test_bad_input_raises(rows: list[SamplerRow], shape: tuple[int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SAMPLER(mx.zeros(shape), rows)


def test_bad_mask_shape_raises() -> None:
    with pytest.raises(ValueError, match="allowed_mask"):
        SAMPLER(mx.zeros((2, V)), rows_of(2), mx.ones((2, V - 1), dtype=mx.bool_))


def test_disabled_truncation_keeps_every_token() -> None:
    # Here float32 prefix sums reach 1.0 before the tail; top_p=1.0 must still drop nothing,
    # or a row's result would depend on whether a neighbour switched truncation on.
    from moeserve.server.engine.truncation import cut

    logits = mx.array([[0.0] + [-20.0] * (V - 1)] * 3)
    rows = [
        SamplerRow(SamplingParams(top_p=1.0, top_k=V)),
        SamplerRow(SamplingParams(top_k=V + 5)),
        SamplerRow(SamplingParams(top_p=1.0, min_p=0.0)),
    ]
    kept = cut(logits, [r.params for r in rows], [True] * 3).apply(logits)
    assert mx.all(kept == logits).item()


def test_ties_at_the_cut_are_all_kept() -> None:
    logits = [0.0] * V
    logits[7] = logits[30] = 5.0
    assert set(draw(logits, 1000, seed=15, top_k=1)) == {7, 30}
    assert set(draw(logits, 1000, seed=15, top_k=3, top_p=0.1)) == {7, 30}


def test_seeded_choices_of_one_request_differ_but_choice_zero_matches_n1() -> None:
    from moeserve.server.engine.sampling import row_key

    keys = [row_key(7, 3, c).tolist() for c in range(4)]
    assert len({tuple(k) for k in keys}) == 4
    assert row_key(7, 3).tolist() == keys[0]
