"""``Pool``: ids from a free list, growth by an eighth, compaction that renumbers live ids.

Every unit is filled with values that name it, so any copy that moves, drops or mixes
units shows. Blocks are stored head-major (``Pool.rows``): the values are written and read
back through that mapping, and one test checks the layout itself. The store's use of pools
(rows, blocks, slots) is in the other tests here.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from moeserve.models.cache.pool import Pool

UNIT = 4  # entries per id, as BLOCK positions per block
SHAPES = {0: ((2, 3),), 5: ((4,), (1, 2))}  # layer -> per-entry tensor shapes


def _pool() -> Pool:
    return Pool(SHAPES, UNIT, mx.float32)


def _entry(pool: Pool, layer: int, tensor: int, slot: int) -> mx.array:
    """Stored rows of one entry (``[H]``) of a tensor."""
    lead = math.prod(SHAPES[layer][tensor][:-1])
    return pool.rows(lead, mx.array([slot], dtype=mx.int32))[0]


def _fill(pool: Pool, ids: list[int]) -> None:
    """Write into every entry of ``ids`` a value naming (layer, tensor, id, entry)."""
    for layer, arrays in pool.arrays.items():
        for t, a in enumerate(arrays):
            for i in ids:
                for e in range(UNIT):
                    rows = _entry(pool, layer, t, i * UNIT + e)
                    a[rows] = mx.full((rows.size, a.shape[1]), _tag(layer, t, i, e), a.dtype)
    mx.eval([a for arrays in pool.arrays.values() for a in arrays])


def _tag(layer: int, tensor: int, unit_id: int, entry: int) -> float:
    return 1000.0 * layer + 100.0 * tensor + 10.0 * unit_id + entry + 1.0


def _check(pool: Pool, where: dict[int, int]) -> None:
    """Unit ``new`` holds what ``_fill`` wrote into unit ``old``, for each ``old -> new``."""
    for layer, arrays in pool.arrays.items():
        for t, a in enumerate(arrays):
            shape = SHAPES[layer][t]
            assert a.shape == (pool.capacity * UNIT * math.prod(shape[:-1]), shape[-1])
            got = np.array(a)
            for old, new in where.items():
                for e in range(UNIT):
                    rows = np.array(_entry(pool, layer, t, new * UNIT + e))
                    assert (got[rows] == _tag(layer, t, old, e)).all(), (old, new, e)


def test_blocks_are_stored_head_major() -> None:
    # What a paged attention relies on: head h of block b is rows [(b*H + h)*UNIT, +UNIT).
    pool = _pool()
    pool.allocate(3)
    rows = np.array(pool.rows(2, mx.array([0, 1, UNIT, 2 * UNIT + 3], dtype=mx.int32)))
    assert rows.tolist() == [
        [0, UNIT],
        [1, UNIT + 1],
        [2 * UNIT, 3 * UNIT],
        [4 * UNIT + 3, 5 * UNIT + 3],
    ]
    recurrent = Pool({1: ((2, 3),)}, 1, mx.float32)
    recurrent.allocate(2)
    assert recurrent.arrays[1][0].shape == (2, 2, 3)  # a row of state is one leading index


def test_ids_are_handed_out_lowest_first_and_capacity_grows_by_an_eighth() -> None:
    pool = _pool()
    assert pool.allocate(3) == [0, 1, 2] and pool.capacity == 3  # what is needed
    assert pool.allocate(1) == [3] and pool.capacity == 4  # 3 + 3 // 8 + 1
    pool.allocate(12)
    assert pool.capacity == 16 and pool.used == 16
    pool.allocate(1)
    assert pool.capacity == 16 + 2 + 1  # an eighth more, not just one
    pool.release([5, 2])
    assert pool.allocate(2) == [2, 5]  # freed ids come back, lowest first
    per_entry = 4 * (2 * 3 + 4 + 1 * 2)
    assert pool.unit_bytes == UNIT * per_entry
    assert pool.nbytes == pool.capacity * UNIT * per_entry


def test_growth_keeps_every_unit_where_it_was() -> None:
    pool = _pool()
    ids = pool.allocate(5)
    _fill(pool, ids)
    pool.allocate(7)  # beyond the capacity: the arrays are copied into larger ones
    assert pool.capacity >= 12
    _check(pool, {i: i for i in ids})


def test_growth_stops_at_the_limit_but_never_short_of_what_is_needed() -> None:
    pool = _pool()
    pool.allocate(16)
    pool.allocate(1, limit_bytes=17 * pool.unit_bytes)
    assert pool.capacity == 17  # no eighth of slack past the limit
    pool.allocate(3, limit_bytes=0)
    assert pool.capacity == 20 and pool.used == 20


def test_compaction_renumbers_live_units_and_keeps_their_contents() -> None:
    pool = _pool()
    ids = pool.allocate(10)
    _fill(pool, ids)
    pool.release([0, 2, 3, 5, 6, 8])
    assert pool.wasteful()  # 4 of 10 in use
    live = [9, 1, 7, 4]  # the order the caller wants them numbered in
    mapping = pool.compact(live)
    assert mapping == {9: 0, 1: 1, 7: 2, 4: 3}
    assert pool.capacity == 4 + 4 // 16 + 1 and pool.used == 4 and not pool.wasteful()
    _check(pool, mapping)
    assert pool.allocate(1) == [4]  # the spare unit, then growth as usual
    assert pool.allocate(1) == [5]
    _check(pool, mapping)


def test_a_pool_compacts_only_when_an_eighth_is_idle_and_to_nothing_when_empty() -> None:
    pool = _pool()
    ids = pool.allocate(40)
    pool.release(ids[36:])  # 36 of 40 in use: within 36 + 36 // 8 + 2
    assert not pool.wasteful()
    pool.release(ids[35:36])  # 35 of 40: 40 < 35 + 4 + 2, still not
    assert not pool.wasteful()
    pool.release(ids[34:35])  # 34 of 40: 40 = 34 + 4 + 2, still not
    assert not pool.wasteful()
    pool.release(ids[33:34])  # 33 of 40: 40 > 33 + 4 + 2
    assert pool.wasteful()
    small = _pool()
    small.allocate(2)
    small.release([1])  # one of two in use: the two spare units keep it
    assert not small.wasteful()
    small.release([0])  # nothing in use: an idle pool gives everything back
    assert small.wasteful()
    assert small.compact([]) == {}
    assert small.capacity == 0 and small.nbytes == 0 and small.arrays == {0: [], 5: []}
    assert small.allocate(2) == [0, 1]  # and grows again from nothing
    _fill(small, [0, 1])
    _check(small, {0: 0, 1: 1})
