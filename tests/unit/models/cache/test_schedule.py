"""Rows join and leave one store in a random order; each row's logits are its solo run's.

A seeded schedule adds rows (their prompts prefilled alone, in random chunks), decodes random
subsets of the running rows in a shuffled batch order, and removes rows when they finish or
at random mid-way (a cancelled request). Rows leaving make the pools compact and renumber
the others' blocks and slots; every row must still see exactly its own positions and state.
After each pass the store's bytes are held to what the pool policy promises (see
``byte_bound``), and once every row has left the store holds nothing.

What this does not check: the scheduler's byte budget (``max_bytes`` stays None here).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models.cache import CacheStore
from tests.unit.models.cache.toy_models import TOYS, close, forward, new_store, solo_run, toy


@dataclass
class Plan:
    """One row's tokens and how far it gets before it leaves."""

    seq_id: str
    prompt: list[int]
    decoded: list[int]  # tokens it would feed one at a time
    stop: int  # decode steps it runs before it leaves (< len(decoded): cancelled)
    got: list[mx.array] = field(default_factory=list)  # [V] logits per pass it sampled from


def byte_bound(store: CacheStore, longest_chunk: int) -> float:
    """What the store may hold for its rows, by the pool policy (``models/cache/pool.py``).

    A pool grows to at most ``9/8 used + 1`` units and, when a row leaves, compacts unless
    its capacity is within ``5/4 used + 2``; between those events units are only added.
    Sliding groups release blocks without compacting, so "used" is bounded by what each row
    may hold at its length (``CacheLayout.row_bytes``, with the longest chunk written, as
    a prefilled row holds its chunk's blocks until its next pass): hence ``5/4`` of every
    row's bytes plus two spare units of each pool.

    Args:
        store: The store.
        longest_chunk: The most positions one pass wrote to a row.

    Returns:
        The bound in bytes.
    """
    layout = store.layout
    rows = sum(layout.row_bytes(r.length, longest_chunk) for r in store.rows.values())
    return 1.25 * rows + 2 * (layout.block_bytes + layout.row_state_bytes)


def _plans(rng: np.random.Generator, count: int) -> list[Plan]:
    plans = []
    for i in range(count):
        prompt = rng.integers(0, 64, int(rng.integers(1, 46))).tolist()
        decoded = rng.integers(0, 64, int(rng.integers(2, 12))).tolist()
        # About one row in four is cancelled part-way (possibly before its first decode).
        stop = int(rng.integers(0, len(decoded))) if rng.random() < 0.25 else len(decoded)
        plans.append(Plan(f"s{i}", prompt, decoded, stop))
    return plans


def _chunks(rng: np.random.Generator, n: int) -> list[int]:
    """Split ``n`` prompt tokens into 1-3 chunk lengths."""
    cuts = sorted(set(rng.integers(1, n, int(rng.integers(0, 3))).tolist())) if n > 1 else []
    edges = [0, *cuts, n]
    return [b - a for a, b in itertools.pairwise(edges)]


def _schedule(name: str, seed: int) -> tuple[list[Plan], int]:
    """Run one random schedule of 8 rows through one store.

    Args:
        name: The toy.
        seed: Seed of the plans and of every choice.

    Returns:
        The plans, their logits filled in, and how often a row leaving shrank the store
        while other rows stayed (pools compacted under running rows).
    """
    model = toy(name)
    rng = np.random.default_rng(seed)
    plans = _plans(rng, 8)
    pending, running = list(plans), []
    store = new_store(model)
    longest, compactions = 1, 0
    while pending or running:
        if pending and (not running or rng.random() < 0.4):  # a row joins
            plan = pending.pop(0)
            store.add(plan.seq_id)
            done = 0
            for n in _chunks(rng, len(plan.prompt)):
                logits = forward(model, store, [plan.seq_id], [plan.prompt[done : done + n]])
                done, longest = done + n, max(longest, n)
            plan.got.append(logits[0, -1])
            running.append(plan)
        else:  # some running rows decode together, in a random order
            order = rng.permutation(len(running))[: int(rng.integers(1, len(running) + 1))]
            batch = [running[i] for i in order]
            tokens = [[p.decoded[len(p.got) - 1]] for p in batch]
            logits = forward(model, store, [p.seq_id for p in batch], tokens)
            for b, plan in enumerate(batch):
                plan.got.append(logits[b, -1])
        assert store.nbytes <= byte_bound(store, longest)
        for plan in [p for p in running if len(p.got) - 1 >= p.stop]:  # rows leave
            before = store.nbytes
            running.remove(plan)
            store.remove(plan.seq_id)
            assert store.nbytes <= byte_bound(store, longest)
            compactions += int(store.nbytes < before and bool(store.rows))
    assert not store.rows and store.nbytes == 0  # everything went back
    return plans, compactions


@pytest.mark.parametrize("name", list(TOYS))
def test_rows_joining_and_leaving_at_random_keep_their_solo_logits(name: str) -> None:
    plans, compactions = _schedule(name, seed=7)
    model = toy(name)
    for plan in plans:
        want = solo_run(model, plan.prompt, plan.decoded[: plan.stop])
        assert len(plan.got) == plan.stop + 1
        assert all(close(g, w) for g, w in zip(plan.got, want)), plan.seq_id
    # Rows left while others ran and the pools shrank under them: renumbering was exercised.
    assert compactions > 0
