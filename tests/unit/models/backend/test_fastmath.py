"""The compiled CPU math: accuracy against float64, agreement with MLX's ops, the fallback.

The kernels (``models.backend.fastmath``) are tested directly; when they run is the CPU
backend's choice, tested by swapping in a ``CpuBackend`` with the knobs each test needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moeserve.models import backend
from moeserve.models.backend import Backend, CpuBackend, fastmath
from moeserve.models.loader import load_model

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "models"


def attend(q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask) -> mx.array:
    return backend.sdpa(q, k, v, scale=scale, mask=mask)


@pytest.fixture
def small_arrays_too() -> Iterator[None]:
    # The tests use small arrays: take the compiled path for them too.
    with backend.use(CpuBackend(min_elements=0)):
        yield


@pytest.fixture
def fast() -> None:
    if not fastmath.available():
        pytest.skip("MLX cannot JIT-compile CPU kernels here (no C++ compiler)")


def test_exp_is_accurate_over_the_float32_range(fast) -> None:
    x = np.concatenate([np.linspace(-87.0, 88.0, 200_001), [0.0, 1e-8, -1e-8, 0.5, -0.5]])
    got = np.array(fastmath.exp(mx.array(x.astype(np.float32))), dtype=np.float64)
    want = np.exp(x.astype(np.float32).astype(np.float64))
    rel = np.abs(got - want) / want
    # A couple of float32 ulps; MLX's own mx.exp is at about 3e-6 on the same inputs.
    assert rel.max() < 2.5e-7


def test_exp_limits(fast) -> None:
    got = fastmath.exp(mx.array([-mx.inf, -1000.0, -88.5, 1000.0, mx.inf])).tolist()
    assert got[:3] == [0.0, 0.0, 0.0]  # masked scores contribute exactly nothing
    assert got[3] == got[4] == pytest.approx(np.exp(np.float64(88.0)), rel=1e-6)  # saturates


@pytest.mark.parametrize("shape", [(3,), (2, 5), (4, 1, 7), (2, 3, 4, 33)])
def test_kernels_serve_every_shape_and_dtype(fast, shape) -> None:
    x = mx.random.normal(shape, key=mx.random.key(len(shape))) * 4
    up = mx.random.normal(shape, key=mx.random.key(9))
    assert mx.allclose(fastmath.exp(x), mx.exp(x), rtol=1e-5).item()
    assert mx.allclose(fastmath.swiglu(x, up), nn.silu(x) * up, rtol=1e-5, atol=1e-6).item()
    for dtype in (mx.float16, mx.bfloat16):
        y = fastmath.swiglu(x.astype(dtype), up.astype(dtype))
        assert y.dtype == dtype
        ref = nn.silu(x.astype(dtype).astype(mx.float32)) * up.astype(dtype).astype(mx.float32)
        assert mx.allclose(y.astype(mx.float32), ref, rtol=1e-2, atol=1e-2).item()


def test_softmax_with_and_without_a_mask(fast) -> None:
    x = mx.random.normal((3, 4, 50), key=mx.random.key(1)) * 6
    assert mx.allclose(fastmath.softmax(x), mx.softmax(x, axis=-1), atol=1e-7).item()
    keep = mx.random.uniform(shape=(3, 1, 50), key=mx.random.key(2)) > 0.3
    keep = keep.at[..., 0].add(True)  # every row keeps something
    got = fastmath.softmax(x, keep=keep)
    want = mx.softmax(mx.where(keep, x, -mx.inf), axis=-1)
    assert mx.allclose(got, want, atol=1e-7).item()
    assert mx.all(mx.where(keep, 0.0, got) == 0).item()  # masked entries are exactly zero
    assert mx.allclose(got.sum(axis=-1), mx.ones((3, 4)), atol=1e-6).item()


@pytest.mark.parametrize(("B", "H", "K", "S"), [(1, 4, 4, 7), (2, 8, 2, 19), (3, 4, 1, 12)])
@pytest.mark.parametrize("mask_kind", ["padding", "per-head", "causal", "none"])
def test_decode_attention_matches_mlx_attention(
    fast, small_arrays_too, B, H, K, S, mask_kind
) -> None:
    keys = mx.random.split(mx.random.key(B * 100 + S), 3)
    q = mx.random.normal((B, H, 1, 16), key=keys[0])
    k = mx.random.normal((B, K, S, 16), key=keys[1])
    v = mx.random.normal((B, K, S, 16), key=keys[2])
    pad = mx.array([i % 3 for i in range(B)])
    real = mx.arange(S)[None, :] >= pad[:, None]  # [B, S]: some columns hidden per row
    masks = {
        "padding": real[:, None, None, :],  # [B, 1, 1, S]
        "per-head": mx.broadcast_to(real[:, None, None, :], (B, H, 1, S)),
        "causal": "causal",
        "none": None,
    }
    mask = masks[mask_kind]
    got = attend(q, k, v, scale=0.25, mask=mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert got.shape == want.shape == (B, H, 1, 16)
    assert mx.allclose(got, want, atol=2e-6).item()
    # The compiled path really ran: its exp rounds differently from MLX's.
    assert not mx.array_equal(got, want).item()


@pytest.mark.parametrize("L", [1, 9])
def test_values_narrower_than_keys(fast, small_arrays_too, L) -> None:
    # MLA (DeepSeek-V3) attends with 192-wide query/key heads and 128-wide values.
    keys = mx.random.split(mx.random.key(L), 3)
    q = mx.random.normal((2, 4, L, 24), key=keys[0])
    k = mx.random.normal((2, 2, 12, 24), key=keys[1])
    v = mx.random.normal((2, 2, 12, 16), key=keys[2])
    mask = "causal" if L > 1 else None
    got = attend(q, k, v, scale=0.2, mask=mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    assert got.shape == want.shape == (2, 4, L, 16)
    assert mx.allclose(got, want, atol=2e-6).item()


@pytest.mark.parametrize(
    ("B", "H", "K", "L", "S"),
    [(1, 4, 4, 7, 7), (1, 8, 2, 37, 37), (2, 4, 1, 20, 53), (1, 6, 3, 64, 200)],
)
@pytest.mark.parametrize("block_scores", [1 << 18, 256])  # one block; many, ragged last one
def test_causal_prefill_attention_matches_mlx(fast, B, H, K, L, S, block_scores) -> None:
    keys = mx.random.split(mx.random.key(L * 1000 + S), 3)
    q = mx.random.normal((B, H, L, 16), key=keys[0])
    k = mx.random.normal((B, K, S, 16), key=keys[1])
    v = mx.random.normal((B, K, S, 16), key=keys[2])
    with backend.use(CpuBackend(min_elements=0, block_scores=block_scores)):
        got = attend(q, k, v, scale=0.25, mask="causal")
        half = attend(
            q.astype(mx.float16),
            k.astype(mx.float16),
            v.astype(mx.float16),
            scale=0.25,
            mask="causal",
        )
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    assert got.shape == want.shape and got.dtype == q.dtype
    assert mx.allclose(got, want, atol=2e-6).item()
    assert not mx.array_equal(got, want).item()  # the blocked path really ran
    assert half.dtype == mx.float16
    assert mx.allclose(half.astype(mx.float32), want, atol=1e-2).item()


def test_small_arrays_use_mlx_ops_and_large_ones_do_not(fast) -> None:
    small = mx.random.normal((4095,), key=mx.random.key(5))
    large = mx.random.normal((4096,), key=mx.random.key(6)) * 5
    q = mx.random.normal((1, 2, 1, 8), key=mx.random.key(7))
    kv = mx.random.normal((1, 2, 10, 8), key=mx.random.key(8))
    with backend.use(CpuBackend()) as cpu:
        assert cpu.min_elements == 4096
        assert mx.array_equal(backend.swiglu(small, small), nn.silu(small) * small).item()
        # The compiled path rounds differently from MLX's exp somewhere among 4,096 values.
        assert not mx.array_equal(backend.swiglu(large, large), nn.silu(large) * large).item()
        # Decode attention goes the compiled way only with enough (row, head, key) scores.
        want = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=0.5, mask=None)
        assert mx.array_equal(attend(q, kv, kv, scale=0.5, mask=None), want).item()


@pytest.mark.parametrize("swapped", [CpuBackend(fast_math=False, min_elements=0), Backend()])
def test_without_fast_math_the_ops_are_mlx_exactly(swapped) -> None:
    x = mx.random.normal((4, 9), key=mx.random.key(3)) * 3
    q = mx.random.normal((1, 2, 3, 8), key=mx.random.key(4))
    w = mx.random.normal((9,), key=mx.random.key(5))
    with backend.use(swapped):
        assert not backend.fast_math_in_use()
        assert mx.array_equal(backend.swiglu(x, x), nn.silu(x) * x).item()
        assert mx.array_equal(backend.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5)).item()
        assert mx.array_equal(
            attend(q, q, q, scale=0.5, mask="causal"),
            mx.fast.scaled_dot_product_attention(q, q, q, scale=0.5, mask="causal"),
        ).item()


def test_the_setting_turns_the_cpu_backend_off_and_on(fastmath_state) -> None:
    backend.set_fast_math(False)
    assert backend.kernels() == "MLX CPU math" and not backend.fast_math_in_use()
    backend.set_fast_math(True)
    assert backend.fast_math_in_use() == fastmath.available()


def test_a_failing_compiler_falls_back_with_a_warning(monkeypatch, caplog) -> None:
    def no_compiler(_x: mx.array) -> mx.array:
        raise RuntimeError("[Compile::eval_cpu] Failed to compile function")

    monkeypatch.setattr(fastmath, "_fast_exp", no_compiler)
    assert not fastmath.probe()
    assert "compiled CPU kernels unavailable" in caplog.text
    # The backend asks ``available`` (the cached probe); where it says no, MLX's ops run.
    monkeypatch.setattr(fastmath, "available", lambda: False)
    x = mx.random.normal((64,), key=mx.random.key(1))
    with backend.use(CpuBackend(min_elements=0)) as cpu:
        assert not cpu.fast_math_active()
        assert mx.array_equal(backend.swiglu(x, x), nn.silu(x) * x).item()


def _greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    out: list[int] = []
    for _ in range(n):
        out.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)[:, -1]
    return out


@pytest.mark.parametrize("family", ["qwen2_moe_a", "glm4_moe_a", "dbrx_a"])
def test_greedy_output_is_the_same_with_and_without(fast, family) -> None:
    model, config = load_model(FIXTURES / family / "mlx", "float32")
    prompts = [
        mx.random.randint(0, config["vocab_size"], (33,), key=mx.random.key(s)).tolist()
        for s in range(2)
    ]
    with backend.use(CpuBackend(fast_math=False)):
        native = [_greedy(model, p, 24) for p in prompts]
    with backend.use(CpuBackend()):
        assert [_greedy(model, p, 24) for p in prompts] == native
