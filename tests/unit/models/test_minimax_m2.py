"""MiniMax-M2 specifics that the golden-logit parity tests do not pin down.

Config validation and spellings (``rotary_dim``, the ``minimax`` alias, MiniMax-Text-01
configs refused), the whole-projection qk-norm, the router (bias steers the choice, weights
renormalised, no scaling), sanitize (both layouts, MTP layers, quantized, idempotent, tied),
the float32 router bias, and an FP8 checkpoint as the publisher ships it loading to the
values torch decodes. The missing-key and incremental-decoding checks every family shares
are in ``test_model_families.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models import load_model
from moeserve.models.errors import ConfigError
from moeserve.models.loader import build_model
from moeserve.models.quantize import quantize_model
from moeserve.models.registry import canonical_model_type
from tests.unit.models.helpers import MINIMAX_M2, assert_same, parameters

E = MINIMAX_M2.config["num_local_experts"]
BLOCK = "model.layers.1.block_sparse_moe"
_model = MINIMAX_M2.model
_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def to_publisher(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our parameters under the publisher's names: per-expert ``experts.{e}.w1/w3/w2``."""
    out = {}
    for name, value in params.items():
        if ".switch_mlp." not in name:
            out[name] = value
            continue
        head, tail = name.split(".switch_mlp.")
        proj, part = tail.split(".", 1)
        for e in range(value.shape[0]):
            out[f"{head}.experts.{e}.{_NAMES[proj]}.{part}"] = value[e]
    return out


@pytest.mark.parametrize(
    "over",
    [
        {"attn_type_list": [0, 1]},  # MiniMax-Text-01's lightning attention
        {"layer_types": ["linear_attention", "full_attention"]},
        {"scoring_func": "softmax"},
        {"qk_norm_type": "per_head"},
        {"shared_intermediate_size": 64},
        {"hidden_act": "gelu"},
        {"num_experts_per_tok": 9},
    ],
)
def test_from_dict_rejects_what_is_not_minimax_m2(over: dict) -> None:
    with pytest.raises(ConfigError):
        MINIMAX_M2.args(**over)


def test_minimax_alias_and_text01_configs() -> None:
    assert canonical_model_type("minimax") == "minimax_m2"
    assert canonical_model_type("MiniMaxM2ForCausalLM") == "minimax_m2"
    model, name = build_model(MINIMAX_M2.config | {"model_type": "minimax"})
    assert name == "minimax_m2" and len(model.layers) == 2
    text01 = MINIMAX_M2.config | {"model_type": "minimax", "attn_type_list": [0, 1]}
    with pytest.raises(ConfigError, match="MiniMax-Text-01"):
        build_model(text01)


def test_rotary_dim_and_whole_projection_norm_shapes() -> None:
    attn = _model().layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 32, 64)
    assert attn.q_norm.weight.shape == (4 * 32,)  # one weight per channel of all heads
    assert attn.k_norm.weight.shape == (2 * 32,)
    assert attn.rope.dims == 16  # rotary_dim
    assert attn.rope.schedule.base == 5_000_000.0  # the release's default theta
    assert _model(rotary_dim=None).layers[0].self_attn.rope.dims == 32
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}
    assert _model(rope_parameters=rope).layers[0].self_attn.rope.dims == 8  # transformers 5 wins
    plain = _model(use_qk_norm=False).layers[0].self_attn
    assert "q_norm" not in plain and "k_norm" not in plain


def test_qk_norm_spans_every_head() -> None:
    attn = _model().layers[0].self_attn
    attn.q_norm.weight = mx.random.uniform(0.5, 1.5, (128,))
    x = mx.random.normal((1, 3, 64))
    q, k, _ = attn._project(x)
    raw = attn.q_proj(x)  # [1, 3, H*D]
    rms = mx.sqrt(mx.mean(raw * raw, axis=-1, keepdims=True) + 1e-6)
    assert mx.allclose(q, raw / rms * attn.q_norm.weight, atol=1e-5).item()
    # Per head (GLM's way) would differ: the heads' scales are not equal.
    heads = raw.reshape(1, 3, 4, 32)
    per_head = heads / mx.sqrt(mx.mean(heads * heads, axis=-1, keepdims=True) + 1e-6)
    per_head = per_head.reshape(1, 3, 128) * attn.q_norm.weight
    assert not mx.allclose(q, per_head, atol=1e-3).item()
    assert k.shape == (1, 3, 64)


def test_correction_bias_changes_the_choice_not_the_weights() -> None:
    block = _model().layers[1].block_sparse_moe
    x = mx.random.normal((5, 64))
    block.e_score_correction_bias = mx.zeros((E,)).at[7].add(10.0)  # expert 7 always wins
    captured = {}
    switch = block.switch_mlp

    def spy(h: mx.array, inds: mx.array) -> mx.array:
        captured["inds"] = inds
        return switch(h, inds)

    block.switch_mlp = spy
    y = block(x)
    inds = captured["inds"]
    assert mx.all(mx.any(inds == 7, axis=-1)).item()
    # Weights: the unbiased sigmoid scores of the chosen experts, renormalised, no scaling.
    chosen = mx.take_along_axis(mx.sigmoid(block.gate(x)), inds, axis=-1)
    weights = chosen / chosen.sum(axis=-1, keepdims=True)
    want = (switch(x, inds) * weights[..., None]).sum(axis=1)
    assert mx.allclose(y, want, atol=1e-5).item()


def test_sanitize_publisher_layout_drops_mtp_and_is_idempotent() -> None:
    model = _model()
    ours = parameters(model)
    publisher = to_publisher(ours)
    assert f"{BLOCK}.experts.7.w2.weight" in publisher
    publisher["model.layers.2.self_attn.q_proj.weight"] = mx.zeros((4, 4))  # an MTP module
    publisher["model.layers.4.block_sparse_moe.gate.weight"] = mx.zeros((4, 4))
    once = model.sanitize(dict(publisher))
    assert_same(once, ours)
    assert_same(model.sanitize(dict(once)), ours)


def test_sanitize_quantized_checkpoints_router_at_8_bits() -> None:
    model = _model()
    quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    ours = parameters(model)
    assert model.layers[1].block_sparse_moe.gate.bits == 8  # as mlx-lm's quant_predicate
    assert model.layers[1].block_sparse_moe.switch_mlp.up_proj.bits == 4
    assert f"{BLOCK}.switch_mlp.gate_proj.scales" in ours
    assert_same(model.sanitize(to_publisher(ours)), ours)


def test_router_bias_stays_float32_and_can_be_absent() -> None:
    model = _model()
    bias = f"{BLOCK}.e_score_correction_bias"
    assert parameters(model)[bias].dtype == mx.float32
    assert not model.cast_predicate(bias)
    assert model.cast_predicate(f"{BLOCK}.gate.weight")
    plain = _model(use_routing_bias=False)
    weights = parameters(plain)
    assert bias not in weights
    assert_same(plain.sanitize({**weights, bias: mx.zeros((E,))}), weights)


def test_tied_embeddings_drop_a_stray_head() -> None:
    model = _model(tie_word_embeddings=True)
    weights = parameters(model)
    assert "lm_head.weight" not in weights
    head = {"lm_head.weight": weights["model.embed_tokens.weight"]}
    assert_same(model.sanitize({**weights, **head}), weights)


def _write_fp8(path: Path, params: dict[str, mx.array], block: tuple[int, int]) -> dict:
    """The tiny model as MiniMax ships it: FP8 attention and experts, float router and norms.

    Returns the float32 values torch decodes the FP8 tensors to, by our parameter names.
    """
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from tests.unit.models.test_fp8 import encode

    tensors, decoded = {}, {}
    for name, value in to_publisher(params).items():
        w = np.array(value.astype(mx.float32))
        fp8 = name.endswith(".weight") and (".self_attn." in name and "_norm" not in name)
        fp8 = fp8 or ".experts." in name
        if not fp8:
            tensors[name] = torch.from_numpy(w)
            continue
        codes, scale, want = encode(w, block)
        tensors[name] = torch.from_numpy(codes).view(torch.float8_e4m3fn)
        tensors[name.replace(".weight", ".weight_scale_inv")] = torch.from_numpy(scale)
        decoded[name] = want
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    quant = {
        "quant_method": "fp8",
        "fmt": "float8_e4m3fn",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
    }
    config = MINIMAX_M2.config | {"quantization_config": quant, "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))
    return decoded


def test_fp8_checkpoint_loads_to_torchs_decoded_values(tmp_path: Path) -> None:
    reference = _model()
    # A 48 x 40 block leaves ragged edge tiles on the 64- and 128-wide matrices.
    decoded = _write_fp8(tmp_path / "fp8", parameters(reference), (48, 40))
    model, _ = load_model(tmp_path / "fp8", dtype="float32")
    got = to_publisher(parameters(model))
    for name, want in decoded.items():
        assert np.array_equal(np.array(got[name]), want), name
    # The float tensors (router, bias, norms, embedding, head) came through untouched.
    for name, value in parameters(model).items():
        if name not in decoded and ".switch_mlp." not in name:
            assert mx.array_equal(value, parameters(reference)[name]).item(), name
    ids = mx.array([[3, 17, 42, 8, 60]])
    assert not mx.allclose(model(ids), reference(ids), atol=1e-3).item()  # FP8 is lossy


def test_fp8_checkpoint_defaults_to_the_config_dtype(tmp_path: Path) -> None:
    _write_fp8(tmp_path / "fp8", parameters(_model()), (128, 128))
    model, _ = load_model(tmp_path / "fp8")
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == mx.bfloat16
    assert model.layers[0].block_sparse_moe.gate.weight.dtype == mx.float32  # stored float32


def test_fp8_checkpoint_converts_to_a_quantized_mlx_one(tmp_path: Path) -> None:
    from moeserve.models.convert import convert

    _write_fp8(tmp_path / "fp8", parameters(_model()), (128, 128))
    config = convert(tmp_path / "fp8", tmp_path / "q4", quantize=True, dtype="float32")
    assert config["quantization"]["model.layers.1.block_sparse_moe.gate"]["bits"] == 8
    assert config["quantization_config"]["bits"] == 4  # mlx-lm's entry, no longer FP8's
    fp8, _ = load_model(tmp_path / "fp8", dtype="float32")
    q4, _ = load_model(tmp_path / "q4", dtype="float32")
    ids = mx.array([[3, 17, 42, 8, 60]])
    assert q4.layers[0].self_attn.q_proj.bits == 4
    assert mx.allclose(q4(ids), fp8(ids), atol=0.5).item()  # 4-bit of the decoded weights
