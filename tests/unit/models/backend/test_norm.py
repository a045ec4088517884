"""RMSNorm: bitwise MLX's, with fewer ops on the CPU (``models.backend.fastmath.rms_norm``)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from moeserve.models import backend
from moeserve.models.backend import CpuBackend, fastmath
from moeserve.models.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("weight_dtype", ["same", "float32"])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 64), (7, 32)])
def test_bitwise_mlx(dtype, weight_dtype, shape) -> None:
    if not fastmath.available():
        pytest.skip("MLX cannot JIT-compile CPU kernels here")
    x = (mx.random.normal(shape, key=mx.random.key(len(shape))) * 5).astype(dtype)
    w = mx.random.normal((shape[-1],), key=mx.random.key(9))
    w = w.astype(dtype if weight_dtype == "same" else mx.float32)
    got, want = fastmath.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5)
    assert got.dtype == want.dtype
    assert mx.array_equal(got, want).item()


def test_module_matches_mlx_module_and_loads_the_same_weight() -> None:
    ours, theirs = RMSNorm(48, eps=1e-6), nn.RMSNorm(48, eps=1e-6)
    weight = mx.random.normal((48,), key=mx.random.key(3))
    ours.load_weights([("weight", weight)])
    theirs.load_weights([("weight", weight)])
    x = mx.random.normal((2, 3, 48), key=mx.random.key(4))
    assert mx.array_equal(ours(x), theirs(x)).item()


def test_the_cpu_backend_takes_the_compiled_tail_only_with_fast_math(monkeypatch) -> None:
    calls: list[int] = []
    real = fastmath.rms_norm

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fastmath, "rms_norm", counted)
    x, w = mx.random.normal((2, 16)), mx.ones((16,))
    with backend.use(CpuBackend(fast_math=False)):
        assert mx.array_equal(RMSNorm(16)(x), mx.fast.rms_norm(x, w, 1e-5)).item()
    assert calls == []
    with backend.use(CpuBackend()) as cpu:
        assert mx.array_equal(RMSNorm(16)(x), mx.fast.rms_norm(x, w, 1e-5)).item()
    assert len(calls) == int(cpu.fast_math_active())
