"""Snapshots (what the prompt cache keeps): adopting one resumes the run it was taken from.

Per kind: ``adopt(snapshot)`` then decoding equals the uninterrupted run, also after the
source row left and its blocks were reused, and in a fresh store. ``usable_length`` follows
each kind's rule: full and latent layers resume any prefix; a sliding layer only a length
whose window the snapshot still holds; recurrent layers only the snapshot's own length or a
saved boundary (``Snapshot.boundaries``, filled from ``recurrent_state``).

Not checked here: how the prompt cache picks, stores or evicts snapshots (``server/``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models.cache import CacheStore, Snapshot
from tests.unit.models.cache.toy_models import TOYS, close, forward, new_store, solo_run, toy

PROMPT, DECODED = 37, 8  # a snapshot is taken after the prompt and 3 decoded tokens
TAKEN = PROMPT + 3


def _tokens(seed: int = 5) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 64, PROMPT).tolist(), rng.integers(0, 64, DECODED).tolist()


def _snapshot(model, store: CacheStore, prompt: list[int], decoded: list[int]) -> Snapshot:
    """Run row "a" through the prompt (one pass) and ``decoded[:3]``; snapshot it.

    The recurrent states at the prompt's end are saved as the snapshot's boundary.
    """
    store.add("a")
    forward(model, store, ["a"], [prompt])
    boundary = store.recurrent_state("a")
    for t in decoded[:3]:
        forward(model, store, ["a"], [[t]])
    snap = store.snapshot("a")
    if boundary:
        snap.boundaries[PROMPT] = boundary
    return snap


def _resume(model, store: CacheStore, seq_id: str, tokens: list[int]) -> list[mx.array]:
    """Feed ``tokens`` to an adopted row: one chunk up to TAKEN (or one token), then singly.

    Returns:
        ``[V]`` logits after the chunk, then after each later token. A chunk reaching TAKEN
        ends where ``solo_run``'s ``want[3]`` was sampled.
    """
    length = store.rows[seq_id].length
    chunk = tokens[: max(1, TAKEN - length)]
    out = [forward(model, store, [seq_id], [chunk])[0, -1]]
    return out + [forward(model, store, [seq_id], [[t]])[0, -1] for t in tokens[len(chunk) :]]


@pytest.mark.parametrize("name", list(TOYS))
def test_adopting_a_snapshot_continues_the_run(name: str) -> None:
    model = toy(name)
    prompt, decoded = _tokens()
    want = solo_run(model, prompt, decoded)  # want[i]: after the prompt and i decoded tokens
    store = new_store(model)
    snap = _snapshot(model, store, prompt, decoded)
    assert snap.length == TAKEN and store.usable_length(snap, TAKEN + 5) == TAKEN
    # The source row leaves and another takes its blocks: the snapshot shares nothing.
    store.remove("a")
    store.add("other")
    forward(model, store, ["other"], [list(range(50))])
    for target, seq_id in ((store, "b"), (new_store(model), "c")):
        target.adopt(seq_id, snap, TAKEN)
        got = _resume(model, target, seq_id, decoded[3:])
        assert all(close(g, w) for g, w in zip(got, want[4:])), seq_id
        assert len(got) == len(want[4:])


@pytest.mark.parametrize("name", ["full", "latent"])
def test_full_and_latent_snapshots_resume_any_prefix(name: str) -> None:
    model = toy(name)
    prompt, decoded = _tokens()
    seq = prompt + decoded
    want = solo_run(model, prompt, decoded)
    store = new_store(model)
    snap = _snapshot(model, store, prompt, decoded)
    assert [store.usable_length(snap, m) for m in range(TAKEN + 3)] == [
        *range(TAKEN + 1),
        TAKEN,
        TAKEN,
    ]
    for m in (1, 16, 23):  # block-aligned or not
        store.adopt(f"b{m}", snap, m)
        got = _resume(model, store, f"b{m}", seq[m:])
        # The chunk seq[m:TAKEN] ends where want[3] was sampled; then one token at a time.
        assert len(got) == len(want[3:])
        assert all(close(g, w) for g, w in zip(got, want[3:])), m


def test_a_sliding_snapshot_resumes_only_where_its_windows_hold() -> None:
    model = toy("sliding")  # windows 5 and 20 around a full layer
    rng = np.random.default_rng(6)
    prompt, decoded = rng.integers(0, 64, 40).tolist(), rng.integers(0, 64, 4).tolist()
    want = solo_run(model, prompt, decoded)
    store = new_store(model)
    store.add("a")
    forward(model, store, ["a"], [prompt])
    forward(model, store, ["a"], [decoded[:1]])  # this pass dropped the blocks out of view
    snap = store.snapshot("a")
    # Dropped whole blocks before position 40 - 5 + 1 = 36 and 40 - 20 + 1 = 21.
    assert snap.starts == [32, 0, 16]
    assert [t[0].shape[2] for t in snap.layers] == [41 - 32, 41, 41 - 16]
    # A row resuming at m first queries position m, which sees m-4.. and m-19..: it needs
    # m - 4 >= 32 and m - 19 >= 16.
    usable = [store.usable_length(snap, m) for m in range(44)]
    assert usable == [0] * 36 + [*range(36, 42), 41, 41]
    with pytest.raises(ValueError):
        store.adopt("early", snap, 35)
    seq = prompt + decoded
    for m in (36, 41):
        store.adopt(f"b{m}", snap, m)
        chunk = seq[m:41] or seq[41:42]
        got = [forward(model, store, [f"b{m}"], [chunk])[0, -1]]
        got += [forward(model, store, [f"b{m}"], [[t]])[0, -1] for t in seq[m + len(chunk) :]]
        first = m + len(chunk) - 40  # want[i] was sampled at position 39 + i
        assert len(got) == len(want[first:])
        assert all(close(g, w) for g, w in zip(got, want[first:])), m


@pytest.mark.parametrize("name", ["recurrent", "hybrid", "mixed"])
def test_recurrent_snapshots_resume_at_their_length_or_a_boundary(name: str) -> None:
    model = toy(name)
    prompt, decoded = _tokens()
    want = solo_run(model, prompt, decoded)
    store = new_store(model)
    snap = _snapshot(model, store, prompt, decoded)
    usable = [store.usable_length(snap, m) for m in range(TAKEN + 3)]
    assert usable == [0] * PROMPT + [PROMPT] * (TAKEN - PROMPT) + [TAKEN] * 3
    store.adopt("b", snap, PROMPT)  # at the boundary: the prompt's states
    got = _resume(model, store, "b", decoded)
    assert all(close(g, w) for g, w in zip(got, want[3:]))
    assert len(got) == len(want[3:])
    # Without the boundary only the snapshot's own length is exact.
    bare = Snapshot(snap.length, snap.layers, snap.starts)
    assert store.usable_length(bare, TAKEN - 1) == 0
    with pytest.raises(ValueError):
        store.adopt("c", bare, PROMPT)


@pytest.mark.parametrize("name", ["sliding", "mixed"])
def test_adopting_no_positions_is_a_fresh_row(name: str) -> None:
    # usable_length may say 0; adopting that much is an empty row with a zero state.
    model = toy(name)
    prompt, decoded = _tokens()
    want = solo_run(model, prompt, decoded[:2])
    store = new_store(model)
    snap = _snapshot(model, store, prompt, decoded)
    assert store.usable_length(snap, 10) == 0
    store.adopt("z", snap, 0)
    assert store.rows["z"].length == 0
    got = [forward(model, store, ["z"], [prompt])[0, -1]]
    got += [forward(model, store, ["z"], [[t]])[0, -1] for t in decoded[:2]]
    assert all(close(g, w) for g, w in zip(got, want))
