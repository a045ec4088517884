"""Multi-head latent attention (``layers/mla.py``) and the FP8 decoding its checkpoints need.

The absorbed form is compared with MLA written out the paper's way (every head's keys and
values decompressed from ``c_kv``), prefill and token-by-token through a real cache; the
cache is checked to hold only the latent widths; ``split_kv_b_proj``, the softmax scale, the
interleaved rotary layout and a hand-made FP8 block are checked against values worked out
here. The golden-logit parity of whole models is in ``tests/parity``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models.cache import CacheLayout, CacheStore, Latent, SequenceCache
from moeserve.models.fp8 import dequantize_block
from moeserve.models.layers.mla import (
    MLAConfig,
    MultiHeadLatentAttention,
    MultiLinear,
    softmax_scale,
    split_kv_b_proj,
)
from moeserve.models.layers.rope import RopeConfig
from tests.unit.models.helpers import DEEPSEEK_V3

H, N, P, R, V = 4, 16, 8, 32, 12  # heads, nope, rope, latent, value widths
YARN = {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.8}


def _config(**over) -> MLAConfig:
    fields = dict(
        hidden_size=64,
        num_heads=H,
        kv_lora_rank=R,
        qk_nope_head_dim=N,
        qk_rope_head_dim=P,
        v_head_dim=V,
        rope=RopeConfig(theta=10000.0, rope_type="yarn", scaling=YARN, max_position_embeddings=64),
        q_lora_rank=24,
    )
    return MLAConfig(**(fields | over))


def _attention(**over) -> MultiHeadLatentAttention:
    mx.random.seed(1)
    attn = MultiHeadLatentAttention(_config(**over))
    mx.eval(attn.parameters())
    return attn


def _expanded(attn: MultiHeadLatentAttention, x: mx.array) -> mx.array:
    """MLA as DeepSeek-V2 writes it: per-head keys and values decompressed, causal softmax."""
    B, L, _ = x.shape
    q = attn._queries(x).reshape(B, L, H, N + P).transpose(0, 2, 1, 3)
    c_kv, k_pe = mx.split(attn.kv_a_proj_with_mqa(x), [R], axis=-1)
    c_kv = attn.kv_a_layernorm(c_kv)  # [B, L, R]
    q_pe, k_pe = attn._rotate(q[..., N:], 0), attn._rotate(k_pe[:, None], 0)
    w_k = attn.embed_q.weight.swapaxes(-1, -2)  # [H, N, R]: kv_b_proj's key rows
    w_v = attn.unembed_out.weight  # [H, V, R]: its value rows
    k_nope = mx.einsum("blr,hnr->bhln", c_kv, w_k)
    v = mx.einsum("blr,hvr->bhlv", c_kv, w_v)
    k = mx.concatenate([k_nope, mx.broadcast_to(k_pe, (B, H, L, P))], axis=-1)
    scores = (mx.concatenate([q[..., :N], q_pe], axis=-1) @ k.swapaxes(-1, -2)) * attn.scale
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    scores = mx.where(causal, scores, -mx.inf)
    out = mx.softmax(scores, axis=-1) @ v  # [B, H, L, V]
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


@pytest.mark.parametrize(
    "over", [{}, {"q_lora_rank": None}, {"rope_interleave": False}, {"attention_bias": True}]
)
def test_absorbed_attention_equals_decompressed_attention(over: dict) -> None:
    attn = _attention(**over)
    x = mx.random.normal((2, 9, 64), key=mx.random.key(2))
    want = _expanded(attn, x)
    assert mx.allclose(attn(x, "causal", None), want, atol=1e-5).item()
    # Token by token through a real latent cache: the same numbers.
    cache = SequenceCache(CacheStore(CacheLayout([attn.cache_kind()], 4), mx.float32))
    view = cache.begin(2, 5)[0]
    steps = [attn(x[:, :5], view.mask, view)]
    for t in range(5, 9):
        view = cache.begin(2, 1)[0]
        steps.append(attn(x[:, t : t + 1], view.mask, view))
    assert mx.allclose(mx.concatenate(steps, axis=1), want, atol=1e-5).item()
    # Not vacuous: without the cache the last token sees only itself.
    alone = attn(x[:, 8:9], "causal", None)
    assert not mx.allclose(alone[:, 0], want[:, 8], atol=1e-3).item()


def test_the_cache_holds_the_latent_and_one_rotary_key_per_token() -> None:
    model = DEEPSEEK_V3.model()
    R3, P3 = DEEPSEEK_V3.config["kv_lora_rank"], DEEPSEEK_V3.config["qk_rope_head_dim"]
    layers = DEEPSEEK_V3.config["num_hidden_layers"]
    assert model.cache_kinds() == [Latent(((1, R3), (1, P3)))] * layers
    layout = model.cache_layout(mx.float32)
    # R + P numbers per token and layer, whatever the heads and their widths.
    assert [g.bytes_per_position for g in layout.groups] == [4 * (R3 + P3) * layers]
    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4, 5]]), cache)
    assert cache.offset == 5


def test_quantized_multilinear_matches_its_dequantized_weights() -> None:
    mx.random.seed(3)
    layer = MultiLinear(64, 32, H)
    q = layer.to_quantized(group_size=32, bits=8)
    x = mx.random.normal((2, H, 3, 64))
    w = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=8)
    assert q(x).shape == (2, H, 3, 32)
    assert mx.allclose(q(x), x @ w.swapaxes(-1, -2), atol=1e-4).item()


def test_split_kv_b_proj_takes_each_heads_key_and_value_rows() -> None:
    cfg = _config()
    kv_b = mx.random.normal((H * (N + V), R), key=mx.random.key(4))
    weights = {"a.kv_b_proj.weight": kv_b}
    split_kv_b_proj(weights, "a", cfg)
    assert sorted(weights) == ["a.embed_q.weight", "a.unembed_out.weight"]
    w = np.array(kv_b).reshape(H, N + V, R)
    assert np.array_equal(np.array(weights["a.embed_q.weight"]), w[:, :N].transpose(0, 2, 1))
    assert np.array_equal(np.array(weights["a.unembed_out.weight"]), w[:, N:])
    again = dict(weights)
    split_kv_b_proj(again, "a", cfg)  # the MLX layout passes untouched
    assert again == weights


def test_split_kv_b_proj_requantizes_a_quantized_projection() -> None:
    cfg = _config(qk_nope_head_dim=32, v_head_dim=16)
    kv_b = mx.random.normal((H * 48, R), key=mx.random.key(5))
    packed, scales, biases = mx.quantize(kv_b, group_size=32, bits=8)
    weights = {"a.kv_b_proj.weight": packed, "a.kv_b_proj.scales": scales}
    weights["a.kv_b_proj.biases"] = biases
    split_kv_b_proj(weights, "a", cfg)
    # Both parts' inputs (N = 32 for embed_q, R = 32 for unembed_out) take groups of 32.
    for part in ("embed_q", "unembed_out"):
        assert weights[f"a.{part}.weight"].dtype == mx.uint32
    full = mx.dequantize(packed, scales, biases, group_size=32, bits=8).reshape(H, 48, R)
    q_w = mx.dequantize(
        weights["a.unembed_out.weight"],
        weights["a.unembed_out.scales"],
        weights["a.unembed_out.biases"],
        group_size=32,
        bits=8,
    )
    # Requantized along the same axis (R), the value rows come back within one step.
    step = mx.max(scales).item()
    assert mx.allclose(q_w, full[:, 32:], rtol=0, atol=step).item()
    # A part whose input the group size does not divide stays float.
    narrow = _config(qk_nope_head_dim=16, v_head_dim=32)
    weights = {"a.kv_b_proj.weight": packed, "a.kv_b_proj.scales": scales}
    weights["a.kv_b_proj.biases"] = biases
    split_kv_b_proj(weights, "a", narrow)
    assert weights["a.embed_q.weight"].dtype == mx.float32
    assert "a.embed_q.scales" not in weights and "a.unembed_out.scales" in weights


def test_softmax_scale_follows_deepseeks_yarn_rule() -> None:
    base = (N + P) ** -0.5
    assert softmax_scale(_config(rope=RopeConfig(theta=1e4))) == pytest.approx(base)
    m = 0.1 * 0.8 * math.log(4.0) + 1.0  # mscale_all_dim 0.8, factor 4
    assert softmax_scale(_config()) == pytest.approx(base * m * m)
    no_all_dim = RopeConfig(theta=1e4, rope_type="yarn", scaling={"factor": 4.0, "mscale": 1.0})
    assert softmax_scale(_config(rope=no_all_dim)) == pytest.approx(base)


def test_interleaved_rotary_pairs_rotate_as_deepseek_rotates_them() -> None:
    attn = _attention(rope=RopeConfig(theta=10000.0))
    x = mx.random.normal((1, 1, 3, P), key=mx.random.key(6))
    got = np.array(attn._rotate(x, 5))
    # Pair (x[2i], x[2i+1]) turns by angle pos * theta^(-2i/P); the outputs are written as all
    # first members, then all second members (transformers' apply_rotary_pos_emb_interleave).
    xs = np.array(x)[0, 0]
    inv = 10000.0 ** (-np.arange(0, P, 2) / P)
    for row, pos in enumerate(range(5, 8)):
        cos, sin = np.cos(pos * inv), np.sin(pos * inv)
        a, b = xs[row, 0::2], xs[row, 1::2]
        want = np.concatenate([a * cos - b * sin, b * cos + a * sin])
        assert np.allclose(got[0, 0, row], want, atol=1e-5)


def test_fp8_known_blocks_decode_to_code_times_their_scale() -> None:
    # e4m3 bytes: 0x38 = 1.0, 0xC0 = -2.0, 0x30 = 0.5, 0x7E = 448 (the largest finite).
    codes = np.full((130, 200), 0x38, dtype=np.uint8)
    codes[0, 0], codes[129, 199], codes[5, 150] = 0xC0, 0x30, 0x7E
    scales = np.array([[2.0, 0.25], [3.0, -1.0]], dtype=np.float32)  # blocks of 128 x 128
    got = np.array(dequantize_block(mx.array(codes), mx.array(scales), (128, 128), mx.float32))
    want = np.empty((130, 200), dtype=np.float32)
    want[:128, :128], want[:128, 128:] = 2.0, 0.25
    want[128:, :128], want[128:, 128:] = 3.0, -1.0
    want[0, 0], want[129, 199], want[5, 150] = -4.0, -0.5, 448 * 0.25
    assert np.array_equal(got, want)
