"""The shared MoE layer: every dispatch path agrees, and routers match a plain-Python reading."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import pytest

from moeserve.models import backend
from moeserve.models.backend import CpuBackend, experts
from moeserve.models.layers.moe import SwitchGLU, grouped_topk, softmax_topk, topk_softmax


def _reference_glu(layer: SwitchGLU, x: mx.array, inds: mx.array) -> mx.array:
    """Per (token, expert) loop with plain matmuls: the definition of the layer."""
    rows = []
    for t in range(x.shape[0]):
        outs = []
        for e in inds[t].tolist():

            def lin(p, v, e=e):
                y = v @ p.weight[e].T
                return y + p.bias[e] if "bias" in p else y

            h = mx.sigmoid(lin(layer.gate_proj, x[t])) * lin(layer.gate_proj, x[t])
            h = h * lin(layer.up_proj, x[t])
            outs.append(lin(layer.down_proj, h))
        rows.append(mx.stack(outs))
    return mx.stack(rows)


@pytest.mark.parametrize("tokens", [1, 3, 20, 80])
@pytest.mark.parametrize("strategy", ["gather", "dense", "grouped"])
@pytest.mark.parametrize("bias", [False, True])
def test_dispatch_paths_agree_with_definition(tokens, strategy, bias) -> None:
    mx.random.seed(tokens)
    layer = SwitchGLU(32, 16, num_experts=6, bias=bias)
    if bias:
        for p in (layer.gate_proj, layer.up_proj, layer.down_proj):
            p.bias = mx.random.normal(p.bias.shape)
    x = mx.random.normal((tokens, 32))
    inds = mx.argsort(mx.random.uniform(shape=(tokens, 6)), axis=-1)[:, :2].astype(mx.uint32)

    class Forced(CpuBackend):
        def expert_strategy(self, *_args) -> str:
            return strategy

    with backend.use(Forced()):
        out = layer(x, inds)
    assert out.shape == (tokens, 2, 32)
    assert mx.allclose(out, _reference_glu(layer, x, inds), atol=1e-4).item()


def test_cpu_dispatch_policy() -> None:
    pick = CpuBackend(gemv=False).expert_strategy
    f32 = mx.float32
    assert pick(1, False, f32) == "gather"
    assert pick(experts.CPU_GATHER_MAX_TOKENS, False, f32) == "gather"
    assert pick(experts.CPU_GATHER_MAX_TOKENS + 1, False, f32) == "dense"
    assert pick(16, False, f32) == "dense"
    assert pick(experts.CPU_DENSE_MAX_TOKENS + 1, False, f32) == "grouped"
    assert pick(16, True, f32) == "gather"
    # MLX's CPU gather_mm is float32-only: half precision takes the dense path instead.
    assert pick(1, False, mx.float16) == "dense"
    assert pick(1, False, mx.bfloat16) == "dense"


def test_cpu_dispatch_policy_with_gemv_forwarding() -> None:
    # 1-row products at sgemv speed make gather_mm the fastest up to ~100 tokens.
    pick = CpuBackend(gemv=True).expert_strategy
    f32 = mx.float32
    assert pick(16, False, f32) == "gather"
    assert pick(experts.CPU_GEMV_GATHER_MAX_TOKENS, False, f32) == "gather"
    assert pick(experts.CPU_GEMV_GATHER_MAX_TOKENS + 1, False, f32) == "grouped"
    assert pick(1, False, mx.float16) == "dense"
    assert pick(512, False, mx.float16) == "grouped"


def test_the_plain_backend_always_gathers() -> None:
    # Metal (and quantized weights anywhere) run gather_mm / gather_qmm whatever the size.
    mx.random.seed(1)
    layer = SwitchGLU(32, 16, num_experts=6)
    x = mx.random.normal((40, 32))
    inds = mx.argsort(mx.random.uniform(shape=(40, 6)), axis=-1)[:, :2].astype(mx.uint32)
    with backend.use(backend.Backend()):
        plain = layer(x, inds)
    want = experts.gathered(x, inds, layer.gate_proj, layer.up_proj, layer.down_proj, swiglu)
    assert mx.array_equal(plain, want).item()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_decode_runs_on_the_cpu(dtype) -> None:
    # One token (a single-stream decode step) in half precision used to reach gather_mm,
    # which MLX's CPU backend refuses for anything but float32.
    mx.random.seed(0)
    layer = SwitchGLU(32, 16, num_experts=6)
    x = mx.random.normal((1, 32))
    inds = mx.array([[1, 4]], dtype=mx.uint32)
    want = _reference_glu(layer, x, inds)
    layer.set_dtype(dtype)
    out = layer(x.astype(dtype), inds)
    assert out.dtype == dtype
    assert mx.allclose(out.astype(mx.float32), want, atol=2e-2).item()


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def _topk(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:k]


def _as_dict(inds: mx.array, weights: mx.array) -> list[dict[int, float]]:
    return [dict(zip(i, w)) for i, w in zip(inds.tolist(), weights.tolist())]


def _close(a: list[dict[int, float]], b: list[dict[int, float]]) -> bool:
    return all(
        x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-5 for k in x) for x, y in zip(a, b)
    )


def test_softmax_topk_with_and_without_renormalisation() -> None:
    logits = mx.random.normal((5, 8), key=mx.random.key(1))
    for p in (None, 1.0, 2.0):
        got = _as_dict(*softmax_topk(logits, 3, renormalize_p=p))
        want = []
        for row in logits.tolist():
            probs = _softmax(row)
            keep = _topk(probs, 3)
            norm = 1.0 if p is None else sum(probs[i] ** p for i in keep) ** (1 / p)
            want.append({i: probs[i] / norm for i in keep})
        assert _close(got, want), p


def test_topk_then_softmax() -> None:
    logits = mx.random.normal((5, 8), key=mx.random.key(2))
    want = []
    for row in logits.tolist():
        keep = _topk(row, 2)
        want.append(dict(zip(keep, _softmax([row[i] for i in keep]))))
    assert _close(_as_dict(*topk_softmax(logits, 2)), want)


def _grouped_reference(row, bias, k, n_group, topk_group, scale):
    scores = [1 / (1 + math.exp(-v)) for v in row]
    select = [s + b for s, b in zip(scores, bias)]
    size = len(row) // n_group
    groups = [select[g * size : (g + 1) * size] for g in range(n_group)]
    rating = [sum(sorted(grp, reverse=True)[:2]) for grp in groups]
    kept = set(_topk(rating, topk_group))
    masked = [v if i // size in kept else -math.inf for i, v in enumerate(select)]
    chosen = _topk(masked, k)
    total = sum(scores[i] for i in chosen)
    return {i: scores[i] / total * scale for i in chosen}


def test_grouped_topk_matches_the_algorithm_even_with_negative_biases() -> None:
    logits = mx.random.normal((6, 8), key=mx.random.key(3)) * 2
    # Strongly negative biases: a pruned group must never win just because 0 > biased score.
    bias = mx.array([-3.0, -2.5, -2.0, -3.5, 0.1, -2.0, -4.0, -1.0])
    got = grouped_topk(
        logits,
        2,
        correction_bias=bias,
        n_group=4,
        topk_group=2,
        normalize=True,
        scaling_factor=2.5,
    )
    want = [_grouped_reference(r, bias.tolist(), 2, 4, 2, 2.5) for r in logits.tolist()]
    assert _close(_as_dict(*got), want)


def test_grouped_topk_bias_changes_choice_not_weight() -> None:
    logits = mx.zeros((1, 4))
    bias = mx.array([0.0, 0.0, 5.0, 0.0])
    inds, weights = grouped_topk(logits, 1, correction_bias=bias, normalize=False)
    assert inds.tolist() == [[2]]
    assert abs(weights.item() - 0.5) < 1e-6  # sigmoid(0), the unbiased score
