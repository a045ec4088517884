"""Each cache kind through the real model path: cached runs equal stateless and solo runs.

The toys (``toy_models.TOYS``) hold full, sliding (with sinks), latent and recurrent layers,
alone and mixed. Checked here: chunked prefill and decoding through ``make_cache()`` give
the stateless forward's logits; rows of different lengths decoded together in one store give
each row's solo logits; a sliding layer keeps only its window's blocks. Rows joining and
leaving at random are in ``test_schedule.py``, snapshots in ``test_snapshots.py``.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models.cache import (
    BLOCK,
    CacheLayout,
    Full,
    Latent,
    Recurrent,
    Sliding,
    StepCache,
)
from tests.unit.models.cache.toy_models import TOYS, close, forward, new_store, solo_run, toy

each_toy = pytest.mark.parametrize("name", list(TOYS))

KIND_OF = {"full": Full, "sliding": Sliding, "latent": Latent, "recurrent": Recurrent}


@each_toy
def test_toys_declare_their_kinds(name: str) -> None:
    kinds = toy(name).cache_kinds()
    want = [KIND_OF[plan.split(":")[0]] for plan in TOYS[name]]
    assert [type(k) for k in kinds] == want
    windows = [int(p.split(":")[1]) for p in TOYS[name] if p.startswith("sliding")]
    assert [k.window for k in kinds if isinstance(k, Sliding)] == windows


@each_toy
def test_chunked_prefill_and_decode_equal_the_stateless_forward(name: str) -> None:
    model = toy(name)
    ids = mx.array(np.random.default_rng(1).integers(0, 64, (2, 50)), dtype=mx.int32)
    full = model(ids)  # [2, 50, V]
    cache = model.make_cache()
    # Chunks of several sizes, then decode steps: past both windows and several blocks, so
    # that sliding layers have dropped blocks by the end.
    cuts = [0, 7, 8, 30, *range(31, 51)]
    steps = [model(ids[:, a:b], cache) for a, b in itertools.pairwise(cuts)]
    assert close(mx.concatenate(steps, axis=1), full)
    # The same last tokens without their context differ: the check above is not vacuous.
    assert not close(model(ids[:, 30:])[:, -1], full[:, -1], atol=1e-3)


# Prompt lengths below and above the windows (5, 20) and BLOCK, all different.
PROMPTS = (3, 9, 17, 26, 40)


@each_toy
def test_batched_decode_equals_solo_decode(name: str) -> None:
    model = toy(name)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 64, n).tolist() for n in PROMPTS]
    steps = 6
    decoded = [rng.integers(0, 64, steps).tolist() for _ in PROMPTS]
    store = new_store(model)
    ids = [f"r{i}" for i in range(len(PROMPTS))]
    got: list[list[mx.array]] = []
    for seq_id, prompt in zip(ids, prompts):  # each row prefilled alone, into one store
        store.add(seq_id)
        got.append([forward(model, store, [seq_id], [prompt])[0, -1]])
    for t in range(steps):  # then decoded together
        logits = forward(model, store, ids, [[d[t]] for d in decoded])
        for b in range(len(ids)):
            got[b].append(logits[b, -1])
    for b, (prompt, tokens) in enumerate(zip(prompts, decoded)):
        want = solo_run(model, prompt, tokens)
        assert all(close(g, w) for g, w in zip(got[b], want)), f"row {b} ({len(prompt)} tokens)"


def test_a_batch_of_different_lengths_is_really_padded() -> None:
    # Guards the test above: its rows share a pass with a padded gather and a mask.
    store = new_store(toy("mixed"))
    for i, n in enumerate(PROMPTS[:2]):
        store.add(f"r{i}")
        StepCache(store, [f"r{i}"], n)
    step = StepCache(store, ["r0", "r1"], 1)
    for group in step.groups:
        assert isinstance(group.mask, mx.array) and group.gather.shape[0] == 2


def test_a_sliding_layer_holds_its_window_and_at_most_one_block_more() -> None:
    model = toy("sliding")
    layout = model.cache_layout()
    store = new_store(model)
    store.add("r")
    rng = np.random.default_rng(3)
    forward(model, store, ["r"], [rng.integers(0, 64, 3).tolist()])
    row = store.rows["r"]
    for _ in range(70):
        forward(model, store, ["r"], [[int(rng.integers(0, 64))]])
        for gi, group in enumerate(layout.groups):
            blocks = len(row.blocks[gi])
            if group.window is None:
                assert blocks == -(-row.length // BLOCK)
                continue
            # Held positions run from the first held block's start to the row's end: the
            # window, plus at most BLOCK - 1 before it in the same block.
            assert row.length - row.dropped[gi] * BLOCK <= group.window + BLOCK - 1
            assert blocks <= CacheLayout.blocks_held(group.window, row.length)
    sliding = [gi for gi, g in enumerate(layout.groups) if g.window is not None]
    assert sorted(layout.groups[gi].window for gi in sliding) == [5, 20]
    for gi in sliding:  # the window's blocks were reused, not grown with the length
        assert row.dropped[gi] > 0
        assert store.pools[gi].capacity <= CacheLayout.blocks_held(
            layout.groups[gi].window, row.length
        )


def test_the_sinks_change_the_sliding_layers() -> None:
    # The toy's random sinks are in play: zeroing them changes the logits.
    model = toy("sliding")
    ids = mx.array([[5, 1, 60, 7, 33, 2, 9, 41]], dtype=mx.int32)
    before = model(ids)
    for layer in model.layers:
        if layer["self_attn"].cfg.sinks:
            layer["self_attn"].sinks = mx.zeros_like(layer["self_attn"].sinks)
    assert not close(model(ids), before, atol=1e-3)
