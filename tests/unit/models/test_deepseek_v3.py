"""DeepSeek-V3 specifics that the golden-logit parity tests do not pin down.

Config validation, the dense-then-MoE layout and the query path's two shapes, sanitize of
every layout (publisher: per-expert tensors, ``kv_b_proj``, an MTP layer, rotary tables;
MLX float and quantized, including the older quantized ``kv_b_proj``), idempotence, the
float32 router bias, and an FP8 publisher checkpoint loaded end to end. MLA itself is in
``test_mla.py``; the checks every family shares are in ``test_model_families.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from moeserve.models import load_model
from moeserve.models.errors import CheckpointError, ConfigError
from moeserve.models.glm4_moe import MoE
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.quantize import quantize_model
from moeserve.models.registry import canonical_model_type
from tests.helpers import FIXTURES
from tests.unit.models.helpers import DEEPSEEK_V3, assert_same, parameters, unstack_experts

_model = DEEPSEEK_V3.model
ATTN = "model.layers.{}.self_attn"
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


def _to_publisher(model, params: dict[str, mx.array]) -> dict[str, mx.array]:
    """The release layout: per-expert tensors, ``kv_b_proj`` whole, MTP layer, rotary tables."""
    cfg = model.args
    H, N = cfg.num_attention_heads, cfg.qk_nope_head_dim
    out = unstack_experts(params)
    for i in range(cfg.num_hidden_layers):
        p = ATTN.format(i)
        w_k = out.pop(f"{p}.embed_q.weight").swapaxes(-1, -2)  # [H, N, R]
        w_v = out.pop(f"{p}.unembed_out.weight")  # [H, V, R]
        kv_b = mx.concatenate([w_k, w_v], axis=1)  # [H, N + V, R]
        out[f"{p}.kv_b_proj.weight"] = kv_b.reshape(H * (N + cfg.v_head_dim), -1)
        out[f"{p}.rotary_emb.inv_freq"] = mx.zeros((4,))
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    for name in ("eh_proj.weight", "enorm.weight", "self_attn.kv_b_proj.weight"):
        out[f"{mtp}.{name}"] = mx.zeros((4, 4))
    return out


@pytest.mark.parametrize(
    "over",
    [
        {"scoring_func": "softmax"},
        {"topk_method": "greedy"},
        {"moe_layer_freq": 2},
        {"qk_rope_head_dim": 7},  # rotary pairs
        {"n_group": 3},  # 8 experts do not split into 3 groups
        {"num_experts_per_tok": 5},  # only 4 experts survive keeping 1 of 2 groups
        {"hidden_act": "gelu"},
    ],
)
def test_from_dict_rejects_unsupported_or_inconsistent_configs(over: dict) -> None:
    with pytest.raises(ConfigError):
        DEEPSEEK_V3.args(**over)


def test_dense_then_moe_and_the_two_query_paths() -> None:
    model = _model(first_k_dense_replace=2, n_shared_experts=2)
    assert [isinstance(layer.mlp, MoE) for layer in model.layers] == [False, False, True]
    assert isinstance(model.layers[0].mlp, GatedMLP)
    assert model.layers[2].mlp.shared_experts.up_proj.weight.shape == (2 * 32, 64)
    attn = model.layers[0].self_attn
    assert attn.q_a_proj.weight.shape == (24, 64) and "q_proj" not in attn
    assert attn.q_b_proj.weight.shape == (4 * (16 + 8), 24)
    assert "bias" in attn.kv_a_proj_with_mqa and "bias" in attn.o_proj  # attention_bias
    plain = _model(q_lora_rank=None, attention_bias=False).layers[0].self_attn
    assert plain.q_proj.weight.shape == (4 * (16 + 8), 64) and "q_a_proj" not in plain
    assert "bias" not in plain.q_proj and "bias" not in plain.o_proj


def test_sanitize_publisher_layout_and_is_idempotent() -> None:
    model = _model()
    ours = parameters(model)
    once = model.sanitize(_to_publisher(model, ours))
    assert_same(once, ours)
    assert_same(model.sanitize(dict(once)), ours)


def test_sanitize_quantized_mlx_layout_and_older_quantized_kv_b_proj() -> None:
    model = _model(qk_nope_head_dim=32, kv_lora_rank=64)  # inputs that groups of 32 divide
    quantize_model(model, bits=8, group_size=32)
    ours = parameters(model)
    assert ours["model.layers.1.mlp.gate.weight"].dtype == mx.float32  # routers stay float
    assert "model.layers.0.self_attn.embed_q.scales" in ours
    assert_same(model.sanitize(dict(ours)), ours)
    # Conversions made before mlx-lm split kv_b_proj store it quantized: it is dequantized,
    # split and quantized again at its own precision.
    float_model = _model(qk_nope_head_dim=32, kv_lora_rank=64)
    old = parameters(float_model)
    p = ATTN.format(0)
    w_k = old.pop(f"{p}.embed_q.weight").swapaxes(-1, -2)
    kv_b = mx.concatenate([w_k, old.pop(f"{p}.unembed_out.weight")], axis=1).reshape(-1, 64)
    old[f"{p}.kv_b_proj.weight"], old[f"{p}.kv_b_proj.scales"], old[f"{p}.kv_b_proj.biases"] = (
        mx.quantize(kv_b, group_size=32, bits=8)
    )
    got = float_model.sanitize(old)
    for part in ("embed_q", "unembed_out"):
        assert got[f"{p}.{part}.weight"].dtype == mx.uint32, part
    assert got[f"{p}.embed_q.scales"].shape == (4, 64, 1)  # [H, R, N / 32]
    assert got[f"{p}.unembed_out.scales"].shape == (4, 12, 2)  # [H, V, R / 32]


def test_router_bias_stays_float32() -> None:
    model = _model()
    assert parameters(model)[BIAS].dtype == mx.float32
    assert not model.cast_predicate(BIAS)
    assert model.cast_predicate("model.layers.1.mlp.switch_mlp.up_proj.weight")


def test_architecture_names_resolve() -> None:
    assert canonical_model_type("DeepseekV3ForCausalLM") == "deepseek_v3"
    assert canonical_model_type("kimi_k2") == "deepseek_v3"  # Kimi-K2's own configs


def test_fp8_publisher_checkpoint_loads_as_its_decoded_values(tmp_path: Path) -> None:
    src = FIXTURES / "deepseek_v3_b" / "hf"
    config = json.loads((src / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    raw = mx.load(str(src / "model.safetensors"))
    assert raw["model.layers.0.mlp.gate_proj.weight"].dtype == mx.uint8  # F8_E4M3 bytes
    assert raw["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    model, _ = load_model(src, dtype="float32")
    # The dense MLP's gate projection, decoded: code times its block's scale.
    codes = mx.from_fp8(raw["model.layers.0.mlp.gate_proj.weight"], dtype=mx.float32)
    scale = mx.repeat(raw["model.layers.0.mlp.gate_proj.weight_scale_inv"], 128, axis=0)[:192]
    got = dict(tree_flatten(model.parameters()))["model.layers.0.mlp.gate_proj.weight"]
    assert mx.array_equal(got, codes * scale).item()
    # Without its quantization_config the codes would be read as integers, and refused.
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected weights.*weight_scale_inv"):
        load_model(tmp_path, dtype="float32")
