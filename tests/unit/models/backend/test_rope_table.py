"""The CPU RoPE path with shared cos/sin tables is bitwise MLX's ``mx.fast.rope``."""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models import backend
from moeserve.models.backend import CpuBackend
from moeserve.models.backend.rope import RopeTables
from moeserve.models.cache import CacheLayout, CacheStore, Full, StepCache
from moeserve.models.layers.rope import RoPE, RopeConfig
from moeserve.models.loader import load_model
from tests.helpers import FIXTURES

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
    want = rope(x, offset)  # outside a forward pass: straight to mx.fast.rope
    with backend.use(CpuBackend()) as cpu, cpu.forward_pass():
        got = rope(x, offset)
        assert len(cpu._tables) == 1  # the table path really ran
    assert got.dtype == want.dtype == dtype
    assert mx.array_equal(got, want).item()


def test_one_table_per_pass_serves_every_layer_and_the_keys() -> None:
    layers = [RoPE(16, CONFIGS["default"]) for _ in range(3)]
    q = mx.random.normal((2, 4, 1, 16), key=mx.random.key(1))
    k = mx.random.normal((2, 2, 1, 16), key=mx.random.key(2))
    with backend.use(CpuBackend()) as cpu:
        with cpu.forward_pass():
            tables = cpu._tables
            for layer in layers:
                layer(q, mx.array([10, 12])), layer(k, mx.array([10, 12]))
            assert len(tables) == 1
            layers[0](q, 7)  # another length or schedule of positions: another table
            RoPE(16, CONFIGS["linear"])(q, mx.array([10, 12]))
            assert len(tables) == 3
        assert cpu._tables is None  # the pass's tables go with it
        with cpu.forward_pass():  # the next step brings new positions, and a new table
            layers[0](q, mx.array([11, 13]))
            assert len(cpu._tables) == 1 and cpu._tables is not tables


def test_the_model_shares_tables_within_a_pass_only(monkeypatch) -> None:
    made: list[RopeTables] = []
    real = RopeTables.__init__

    def record(self) -> None:
        real(self)
        made.append(self)

    monkeypatch.setattr(RopeTables, "__init__", record)
    model, _ = load_model(FIXTURES / "qwen2_moe_a" / "mlx", "float32")
    with backend.use(CpuBackend()):
        cache = model.make_cache()
        model(mx.array([[1, 2, 3, 4], [1, 2, 3, 4]]), cache=cache)
        model(mx.array([[5], [6]]), cache=cache)
    assert [len(t) for t in made] == [1, 1]  # one schedule, one table per forward pass


def test_batched_positions_follow_each_row() -> None:
    store = CacheStore(CacheLayout([Full(2, 8)], 4), mx.float32)
    for seq_id, length in (("a", 3), ("c", 1)):
        store.add(seq_id)
        StepCache(store, [seq_id], length)
    assert StepCache(store, ["a"], 1).rope_offset == 3
    assert StepCache(store, ["a", "c"], 1).rope_offset.tolist() == [4, 1]
