"""gpt-oss specifics that the golden parity tests do not pin down on their own.

Expected values are derived independently of the model code: the publisher layouts are
written here from their description (gate/up interleaved by rows, transformers' float
``[E, in, out]``, MXFP4 bytes with the low nibble first and E8M0 scales), the MXFP4 block
decodes against a hand-written E2M1 table, the MoE block against a per-token loop, and the
sinks against what a sink of +inf or -inf must do to a softmax.

The missing-key and incremental-decoding checks every family shares are in
``test_model_families.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moeserve.models import backend, load_model
from moeserve.models.backend import CpuBackend
from moeserve.models.cache import Full, Sliding
from moeserve.models.errors import ConfigError
from moeserve.models.gpt_oss import ModelArgs, SparseMoeBlock, clamped_swiglu
from moeserve.models.layers.attention import Attention
from tests.unit.models.helpers import GPT_OSS, assert_same, parameters

TINY = GPT_OSS.config
E, F, M = TINY["num_local_experts"], TINY["intermediate_size"], TINY["hidden_size"]
LAYERS = TINY["num_hidden_layers"]
# OCP MX E2M1, code -> value, written out rather than imported.
E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
_model = GPT_OSS.model


def _interleave(gate: mx.array, up: mx.array) -> mx.array:
    """Rows of gate and up alternated along axis 1 (gate first), the publisher's fusion."""
    return mx.stack([gate, up], axis=2).reshape(gate.shape[0], -1, *gate.shape[2:])


def _publisher_float(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our float parameters in transformers' layout: fused, interleaved, ``[E, in, out]``."""
    out = dict(params)
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts"
        gate, up = out.pop(f"{p}.gate_proj.weight"), out.pop(f"{p}.up_proj.weight")
        out[f"{p}.gate_up_proj"] = _interleave(gate, up).swapaxes(1, 2)  # [E, M, 2F]
        bias = _interleave(out.pop(f"{p}.gate_proj.bias"), out.pop(f"{p}.up_proj.bias"))
        out[f"{p}.gate_up_proj_bias"] = bias  # [E, 2F]
        out[f"{p}.down_proj"] = out.pop(f"{p}.down_proj.weight").swapaxes(1, 2)  # [E, F, M]
        out[f"{p}.down_proj_bias"] = out.pop(f"{p}.down_proj.bias")
    return out


def _randomize(model: nn.Module) -> None:
    """Non-zero biases and sinks (they start at zero), so that their mapping is visible."""
    rng = np.random.default_rng(3)
    fresh = {
        k: mx.array(rng.standard_normal(v.shape).astype(np.float32)) * 0.3
        for k, v in parameters(model).items()
        if k.endswith((".bias", ".sinks"))
    }
    model.load_weights(list(fresh.items()), strict=False)


def test_sanitize_splits_the_float_publisher_layout() -> None:
    model = _model()
    _randomize(model)
    params = parameters(model)
    assert_same(model.sanitize(_publisher_float(params)), params)


def test_sanitize_passes_the_mlx_layout_through_and_is_idempotent() -> None:
    model = _model()
    params = parameters(model)
    once = model.sanitize(dict(params))
    assert_same(model.sanitize(dict(once)), params)


def _blocks(codes: np.ndarray) -> np.ndarray:
    """E2M1 codes ``[..., in]`` packed as the publisher does: ``[..., in / 32, 16]`` bytes."""
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # low nibble first
    return packed.reshape(*codes.shape[:-1], -1, 16)


def _mxfp4_checkpoint(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, dict]:
    """The tiny model saved in the publisher's MXFP4 layout, and the values it decodes to.

    Returns:
        The directory and, per layer, the experts' float weights in our layout.
    """
    model = _model()
    _randomize(model)
    tensors = _publisher_float(parameters(model))
    expected: dict[str, np.ndarray] = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts"
        for fused, rows, cols in (("gate_up_proj", 2 * F, M), ("down_proj", M, F)):
            codes = rng.integers(0, 16, (E, rows, cols))
            exps = rng.integers(-3, 2, (E, rows, cols // 32))  # powers of two around 1
            del tensors[f"{p}.{fused}"]
            tensors[f"{p}.{fused}_blocks"] = mx.array(_blocks(codes))
            tensors[f"{p}.{fused}_scales"] = mx.array((exps + 127).astype(np.uint8))
            values = np.array(E2M1, np.float32)[codes] * np.exp2(np.repeat(exps, 32, axis=-1))
            if fused == "gate_up_proj":
                expected[f"{p}.gate_proj"], expected[f"{p}.up_proj"] = (
                    values[:, 0::2],
                    values[:, 1::2],
                )
            else:
                expected[f"{p}.down_proj"] = values
    mx.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    config = TINY | {"quantization_config": {"quant_method": "mxfp4"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, expected


def test_publisher_mxfp4_blocks_load_as_mlx_mxfp4(tmp_path: Path) -> None:
    path, expected = _mxfp4_checkpoint(tmp_path, np.random.default_rng(0))
    model, _ = load_model(path, dtype="float32")
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    for name, values in expected.items():
        proj = modules[name]
        assert (proj.mode, proj.bits, proj.group_size) == ("mxfp4", 4, 32)  # kept at 4 bits
        decoded = mx.dequantize(
            proj.weight, proj.scales, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32
        )
        np.testing.assert_array_equal(np.array(decoded), values, err_msg=name)
    # The quantized experts compute what float experts with those values compute.
    float_model = _model()
    weights = {k: v for k, v in parameters(model).items() if ".experts." not in k}
    for name, values in expected.items():
        weights[f"{name}.weight"] = mx.array(values)
        weights[f"{name}.bias"] = modules[name].bias
    float_model.load_weights(list(weights.items()), strict=True)
    ids = mx.array(GPT_OSS.decode_ids)
    assert mx.allclose(model(ids), float_model(ids), atol=1e-4).item()


def test_a_known_mxfp4_block_decodes_to_e2m1_times_the_scale(tmp_path: Path) -> None:
    path, _ = _mxfp4_checkpoint(tmp_path, np.random.default_rng(1))
    tensors = mx.load(str(path / "model.safetensors"))
    p = "model.layers.0.mlp.experts.down_proj"
    blocks = np.array(tensors[f"{p}_blocks"])
    scales = np.array(tensors[f"{p}_scales"])
    # Expert 0, output row 0, first group: the 16 codes twice over, scale 2**-1.
    blocks[0, 0, 0] = [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] * 2
    scales[0, 0, 0] = 126
    tensors[f"{p}_blocks"], tensors[f"{p}_scales"] = mx.array(blocks), mx.array(scales)
    mx.save_safetensors(str(path / "model.safetensors"), tensors)
    model, _ = load_model(path, dtype="float32")
    down = model.layers[0].mlp.experts.down_proj
    decoded = mx.dequantize(
        down.weight, down.scales, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32
    )
    assert np.array(decoded[0, 0, :32]).tolist() == [v / 2 for v in E2M1] * 2


def test_mlx_lm_mxfp4_config_keeps_affine_overrides_affine(tmp_path: Path) -> None:
    # mlx-lm, quantizing the rest of an MXFP4 gpt-oss, keeps mode mxfp4 as the default and
    # writes its 8-bit router override without a mode; the router is affine all the same.
    path, _ = _mxfp4_checkpoint(tmp_path, np.random.default_rng(2))
    model, _ = load_model(path, dtype="float32")
    router = "model.layers.0.mlp.router"
    nn.quantize(model, 64, 8, class_predicate=lambda p, _m: p.endswith("mlp.router"))
    quant = {"group_size": 32, "bits": 4, "mode": "mxfp4", router: {"group_size": 64, "bits": 8}}
    mx.save_safetensors(str(path / "model.safetensors"), parameters(model))
    config = TINY | {"quantization": quant}
    (path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(path, dtype="float32")
    modules = dict(tree_flatten(loaded.leaf_modules(), is_leaf=nn.Module.is_module))
    assert (modules[router].mode, modules[router].bits) == ("affine", 8)
    assert modules["model.layers.0.mlp.experts.up_proj"].mode == "mxfp4"
    ids = mx.array(GPT_OSS.decode_ids)
    assert mx.allclose(loaded(ids), model(ids), atol=1e-5).item()


def test_clamped_swiglu_clamps_the_gate_from_above_only() -> None:
    gate = mx.array([10.0, -10.0, 0.5, 7.0])
    up = mx.array([10.0, -10.0, 0.0, -8.0])
    got = np.array(clamped_swiglu(gate, up, alpha=1.702, limit=7.0))

    def expected(g: float, u: float) -> float:
        g, u = min(g, 7.0), max(-7.0, min(u, 7.0))
        return (u + 1) * g / (1 + np.exp(-1.702 * g))

    want = [expected(g, u) for g, u in zip([10.0, -10.0, 0.5, 7.0], [10.0, -10.0, 0.0, -8.0])]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[1] != 0.0  # the very negative gate was not clamped up to -7


def _moe_reference(block: SparseMoeBlock, x: np.ndarray, k: int, limit: float) -> np.ndarray:
    """Per token: top-k router logits (with bias), softmax of those, biased clamped experts."""
    p = {n: np.array(v) for n, v in tree_flatten(block.parameters())}
    out = np.zeros_like(x)
    for t, row in enumerate(x):
        logits = p["router.weight"] @ row + p["router.bias"]
        top = np.argsort(-logits)[:k]
        w = np.exp(logits[top] - logits[top].max())
        for e, weight in zip(top, w / w.sum()):
            g = p["experts.gate_proj.weight"][e] @ row + p["experts.gate_proj.bias"][e]
            u = p["experts.up_proj.weight"][e] @ row + p["experts.up_proj.bias"][e]
            g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
            h = (u + 1) * g / (1 + np.exp(-1.702 * g))
            out[t] += weight * (
                p["experts.down_proj.weight"][e] @ h + p["experts.down_proj.bias"][e]
            )
    return out


@pytest.mark.parametrize("strategy", ["gather", "dense", "grouped"])
def test_moe_block_matches_a_per_token_loop(strategy: str) -> None:
    model = _model()
    _randomize(model)
    block = model.layers[0].mlp
    x = np.random.default_rng(4).standard_normal((40, M)).astype(np.float32)
    want = _moe_reference(block, x, TINY["num_experts_per_tok"], TINY["swiglu_limit"])

    class Forced(CpuBackend):
        def expert_strategy(self, tokens: int, quantized: bool, dtype: mx.Dtype) -> str:
            return strategy

    with backend.use(Forced()):
        got = np.array(block(mx.array(x)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sinks_take_softmax_mass_without_a_value() -> None:
    model = _model()
    _randomize(model)
    attn: Attention = model.layers[1].self_attn  # full attention
    x = mx.array(np.random.default_rng(5).standard_normal((1, 6, M)).astype(np.float32))
    with_sinks = attn(x, "causal", None)
    # A sink of -inf takes nothing: plain attention.
    attn.sinks = mx.full(attn.sinks.shape, -1e9)
    plain = attn(x, "causal", None)
    assert not mx.allclose(with_sinks, plain, atol=1e-3).item()  # the learned sinks matter
    # A sink of +inf takes everything: the heads output zero, leaving o_proj's bias.
    attn.sinks = mx.full(attn.sinks.shape, 1e9)
    nothing = attn(x, "causal", None)
    assert mx.allclose(nothing, mx.broadcast_to(attn.o_proj.bias, nothing.shape), atol=1e-5).item()


def test_layer_types_declare_sliding_and_full_cache_kinds() -> None:
    assert _model().cache_kinds() == [Sliding(2, 16, sliding_window=3), Full(2, 16)]
    # Without layer_types, transformers alternates, sliding first.
    kinds = _model(num_hidden_layers=4, layer_types=None).cache_kinds()
    assert kinds == [Sliding(2, 16, sliding_window=3), Full(2, 16)] * 2
    # Without a window, "sliding" layers attend to everything.
    assert _model(sliding_window=None).cache_kinds() == [Full(2, 16)] * 2


def test_config_checks_and_rope_defaults() -> None:
    with pytest.raises(ConfigError, match="layer_types"):
        GPT_OSS.args(layer_types=["sliding_attention"])
    with pytest.raises(ConfigError, match="unknown"):
        GPT_OSS.args(layer_types=["sliding_attention", "chunked_attention"])
    bare = {k: v for k, v in TINY.items() if k != "rope_scaling"}
    rope = ModelArgs.from_dict(bare).rope  # the release's defaults
    assert (rope.theta, rope.rope_type) == (150000.0, "yarn")
    assert rope.scaling["factor"] == 32.0 and rope.scaling["truncate"] is False
    assert rope.scaling["original_max_position_embeddings"] == 4096
