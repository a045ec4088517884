"""The masks a pass's cache views build: none where nothing is hidden, exact where needed.

A decode pass reads whole 16-position blocks (so attention may read the pool in place), and
its mask hides what lies past each row's query; a prefill pass gathers exact positions.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from moeserve.models.cache import CacheLayout, CacheStore, Full, Sliding, StepCache
from moeserve.models.loader import load_model

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "qwen2_moe_a" / "mlx"


def _store(*lengths: int, kind=None) -> CacheStore:
    store = CacheStore(CacheLayout([kind or Full(2, 8)], 4), mx.float32)
    for i, length in enumerate(lengths):
        store.add(f"r{i}")
        StepCache(store, [f"r{i}"], length)
    return store


def test_full_blocks_need_no_mask() -> None:
    store = _store(15, 15)  # the decoded token fills each row's block
    assert StepCache(store, ["r0", "r1"], 1).groups[0].mask is None
    store = _store(31)
    step = StepCache(store, ["r0"], 1)
    assert step.groups[0].mask is None and step.groups[0].gather.shape == (1, 32)


def test_decode_reads_whole_blocks_masked_past_each_query() -> None:
    store = _store(4, 2)
    group = StepCache(store, ["r0", "r1"], 1).groups[0]
    assert group.gather.shape == (2, 16)
    # Row 0's query is at 4, row 1's at 2; the rest of each block is not written yet.
    assert group.mask.tolist() == [
        [[[True] * 5 + [False] * 11]],
        [[[True] * 3 + [False] * 13]],
    ]
    store = _store(20, 3)  # two blocks against one: row 1's second is padding
    group = StepCache(store, ["r0", "r1"], 1).groups[0]
    assert group.gather.shape == (2, 32)
    assert group.mask.tolist()[1] == [[[True] * 4 + [False] * 28]]
    assert group.blocks.tolist()[1][1] == group.blocks.tolist()[1][0]  # its own block again


def test_prefill_of_one_row_is_causal_and_a_window_is_explicit() -> None:
    store = _store(3)
    assert StepCache(store, ["r0"], 4).groups[0].mask == "causal"
    store = _store(3, kind=Sliding(2, 8, sliding_window=3))
    mask = StepCache(store, ["r0"], 2).groups[0].mask  # queries at 3, 4 see keys 1..4
    assert mask.tolist() == [[[[True, True, True, False], [False, True, True, True]]]]


def test_dropping_the_mask_changes_nothing(monkeypatch) -> None:
    model, _ = load_model(FIXTURE, "float32")
    prompt = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32]])

    def decode_logits() -> mx.array:
        cache = model.make_cache()
        model(prompt, cache=cache)
        return model(mx.array([[26]]), cache=cache)[:, -1]

    without = decode_logits()
    from moeserve.models.cache import views

    real = views._GroupStep._mask

    def always_a_mask(rows, new, window, starts, counts, width):
        mask = real(rows, new, window, starts, counts, width)
        return mx.ones((len(rows), 1, new, width), dtype=mx.bool_) if mask is None else mask

    monkeypatch.setattr(views._GroupStep, "_mask", staticmethod(always_a_mask))
    with_mask = decode_logits()
    assert mx.array_equal(without, with_mask).item()
    seen = []
    monkeypatch.setattr(
        views._GroupStep, "_mask", staticmethod(lambda *a: seen.append(real(*a)) or real(*a))
    )
    decode_logits()
    assert seen[-1] is None  # the decode step above did run without a mask
