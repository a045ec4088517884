"""The CPU RoPE path with shared cos/sin tables is bitwise MLX's ``mx.fast.rope``."""

from __future__ import annotations

import mlx.core as mx
import pytest

from models.cache import BatchKVCache, KVCache
from models.layers import rope as rope_mod
from models.layers.rope import RoPE, RopeConfig

CONFIGS = {
    "default": RopeConfig(theta=10000.0),
    "linear": RopeConfig(theta=10000.0, rope_type="linear", scaling={"factor": 4.0}),
    "yarn": RopeConfig(
        theta=10000.0,
        rope_type="yarn",
        scaling={"factor": 4.0, "original_max_position_embeddings": 64},
        max_position_embeddings=256,
    ),
    "llama3": RopeConfig(
        theta=500000.0,
        rope_type="llama3",
        scaling={"factor": 8.0, "original_max_position_embeddings": 64},
    ),
    "partial": RopeConfig(theta=10000.0, partial_rotary_factor=0.5),
}


def _reference(rope: RoPE, x: mx.array, offset: int | mx.array) -> mx.array:
    """What RoPE returned before the tables: mx.fast.rope on every call."""
    return rope(x, offset)  # no positions_key: straight to mx.fast.rope


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize(
    ("B", "L", "offset"),
    [(1, 1, 300), (1, 7, 0), (1, 5, 1234), (3, 1, "rows"), (1, 1, "one-row"), (2, 4, "rows")],
)
def test_tables_are_bitwise_mlx(name, dtype, B, L, offset) -> None:
    rope = RoPE(32, CONFIGS[name])
    x = (mx.random.normal((B, 4, L, 32), key=mx.random.key(B * 10 + L)) * 3).astype(dtype)
    if offset == "rows":
        offset = mx.array([5, 17, 90][:B], dtype=mx.int32)
    elif offset == "one-row":
        offset = mx.array([41], dtype=mx.int32)
    key = offset if isinstance(offset, int) else ("test", tuple(offset.tolist()))
    got = rope(x, offset, key)
    want = _reference(rope, x, offset)
    assert got.dtype == want.dtype == dtype
    assert mx.array_equal(got, want).item()


def test_one_table_serves_every_layer_and_the_keys(monkeypatch) -> None:
    monkeypatch.setattr(rope_mod, "_TABLES", type(rope_mod._TABLES)())
    layers = [RoPE(16, CONFIGS["default"]) for _ in range(3)]
    q = mx.random.normal((2, 4, 1, 16), key=mx.random.key(1))
    k = mx.random.normal((2, 2, 1, 16), key=mx.random.key(2))
    offset, key = mx.array([10, 12]), (12, (2, 0))
    for layer in layers:
        layer(q, offset, key), layer(k, offset, key)
    assert len(rope_mod._TABLES) == 1
    layers[0](q, mx.array([11, 13]), (13, (2, 0)))  # the next step: a new table
    layers[0](q, 7, 7)  # another schedule of positions
    assert len(rope_mod._TABLES) == 3
    for step in range(20):  # old tables are dropped
        layers[0](q, step, step)
    assert len(rope_mod._TABLES) == rope_mod._TABLES_KEPT


def test_cache_keys_follow_the_positions() -> None:
    a, b = KVCache(), KVCache()
    kv = mx.zeros((1, 2, 3, 8))
    a.update_and_fetch(kv, kv)
    b.update_and_fetch(kv, kv)
    assert a.rope_key == b.rope_key == 3
    batch = BatchKVCache.merge([a, b])
    other = BatchKVCache.merge([b, a])
    assert batch.rope_key == other.rope_key  # same positions, same table
    c = KVCache()
    c.update_and_fetch(mx.zeros((1, 2, 1, 8)), mx.zeros((1, 2, 1, 8)))
    padded = BatchKVCache.merge([a, c])
    assert padded.rope_key != batch.rope_key
    assert padded.rope_offset.tolist() == [3, 1]
