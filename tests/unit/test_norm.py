"""models.layers.norm: bitwise MLX's RMSNorm, with fewer ops on the CPU."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from models.layers import fastmath
from models.layers.norm import RMSNorm, rms_norm


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("weight_dtype", ["same", "float32"])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 64), (7, 32)])
def test_bitwise_mlx(dtype, weight_dtype, shape) -> None:
    if not fastmath.enabled():
        pytest.skip("MLX cannot JIT-compile CPU kernels here")
    x = (mx.random.normal(shape, key=mx.random.key(len(shape))) * 5).astype(dtype)
    w = mx.random.normal((shape[-1],), key=mx.random.key(9))
    w = w.astype(dtype if weight_dtype == "same" else mx.float32)
    got, want = rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5)
    assert got.dtype == want.dtype
    assert mx.array_equal(got, want).item()


def test_module_matches_mlx_module_and_loads_the_same_weight() -> None:
    ours, theirs = RMSNorm(48, eps=1e-6), nn.RMSNorm(48, eps=1e-6)
    weight = mx.random.normal((48,), key=mx.random.key(3))
    ours.load_weights([("weight", weight)])
    theirs.load_weights([("weight", weight)])
    x = mx.random.normal((2, 3, 48), key=mx.random.key(4))
    assert mx.array_equal(ours(x), theirs(x)).item()


def test_off_is_mlx_itself(fastmath_state) -> None:
    fastmath.set_enabled(False)
    x, w = mx.random.normal((2, 16)), mx.ones((16,))
    assert mx.array_equal(rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6)).item()
