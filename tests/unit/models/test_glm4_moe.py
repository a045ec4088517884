"""GLM-4-MoE specifics that the golden-logit parity tests do not pin down.

Config validation and spellings (explicit head_dim, partial rotary default, transformers 5's
rope_parameters), dense-then-MoE layout, sanitize (MTP layers dropped, experts stacked, both
layouts, quantized, idempotent), the float32 router bias, quantization rules. The
missing-key and incremental-decoding checks every family shares are in
``test_model_families.py``.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models.errors import ConfigError
from moeserve.models.glm4_moe import MoE
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.quantize import quantize_model
from tests.unit.models.helpers import GLM4_MOE, assert_same, parameters, unstack_experts

E = GLM4_MOE.config["n_routed_experts"]  # routed experts in the tiny config
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"
_model = GLM4_MOE.model


def _to_publisher(params: dict[str, mx.array], mtp_layer: int) -> dict[str, mx.array]:
    """Per-expert tensors, plus an MTP layer at index ``mtp_layer`` as GLM-4.5 ships it."""
    out = unstack_experts(params)
    for name in ("eh_proj.weight", "enorm.weight", "mlp.experts.0.up_proj.weight"):
        out[f"model.layers.{mtp_layer}.{name}"] = mx.zeros((4, 4))
    return out


@pytest.mark.parametrize(
    "over",
    [
        {"scoring_func": "softmax"},  # only DeepSeek-V3-style sigmoid routing is implemented
        {"topk_method": "greedy"},
        {"n_group": 3},  # 8 experts do not split into 3 groups
        {"topk_group": 3},  # more groups kept than exist
        {"num_experts_per_tok": 5},  # only 4 experts survive keeping 1 of 2 groups
    ],
)
def test_from_dict_rejects_unsupported_or_inconsistent_routing(over: dict) -> None:
    with pytest.raises(ConfigError):
        GLM4_MOE.args(**over)


def test_explicit_head_dim_and_partial_rotary_default() -> None:
    attn = _model().layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 32, 64)
    assert attn.q_norm.weight.shape == (32,)
    assert attn.rope.dims == 16  # transformers' default partial_rotary_factor for GLM: 0.5
    assert "bias" in attn.q_proj and "bias" not in attn.o_proj


def test_transformers5_rope_parameters_win() -> None:
    rope = {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.25}
    attn = _model(rope_parameters=rope, rope_theta=1.0).layers[0].self_attn
    assert attn.rope.dims == 8
    assert attn.rope.schedule.base == 5e5


def test_first_k_dense_replace_and_shared_expert_width() -> None:
    model = _model(num_hidden_layers=3, first_k_dense_replace=2, n_shared_experts=2)
    assert [isinstance(layer.mlp, MoE) for layer in model.layers] == [False, False, True]
    assert isinstance(model.layers[0].mlp, GatedMLP)
    assert model.layers[2].mlp.shared_experts.up_proj.weight.shape == (2 * 64, 64)
    assert _model(n_shared_experts=0).layers[1].mlp.shared_experts is None


def test_sanitize_drops_mtp_layers_stacks_experts_and_is_idempotent() -> None:
    model = _model()
    ours = parameters(model)
    publisher = _to_publisher(ours, mtp_layer=2)
    publisher["model.layers.3.eh_proj.weight"] = mx.zeros((2, 2))  # any index >= n goes
    once = model.sanitize(dict(publisher))
    assert_same(once, ours)
    assert_same(model.sanitize(dict(once)), ours)


def test_sanitize_handles_quantized_checkpoints_like_mlx_lm() -> None:
    model = _model()
    quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    ours = parameters(model)
    # mlx-lm's router is a bare matrix, never quantized; the experts are.
    assert model.quant_overrides == ()
    assert "model.layers.1.mlp.gate.scales" not in ours
    assert ours["model.layers.1.mlp.gate.weight"].dtype == mx.float32
    assert "model.layers.1.mlp.switch_mlp.gate_proj.scales" in ours
    assert_same(model.sanitize(_to_publisher(ours, mtp_layer=2)), ours)


def test_router_bias_stays_float32() -> None:
    model = _model()
    assert parameters(model)[BIAS].dtype == mx.float32
    assert not model.cast_predicate(BIAS)
    assert model.cast_predicate("model.layers.1.mlp.gate.weight")
    assert model.cast_predicate("model.layers.1.mlp.switch_mlp.up_proj.weight")


def test_correction_bias_changes_the_choice_not_the_weights() -> None:
    gate = _model().layers[1].mlp.gate
    x = mx.random.normal((5, 64))
    gate.e_score_correction_bias = mx.zeros((E,)).at[7].add(10.0)  # expert 7 always wins
    inds, weights = gate(x)
    assert mx.all(mx.any(inds == 7, axis=-1)).item()
    # Weights: the *unbiased* sigmoid scores of the chosen experts, renormalised, times 2.5.
    chosen = mx.take_along_axis(mx.sigmoid(x @ gate.weight.T), inds, axis=-1)
    expected = 2.5 * chosen / chosen.sum(axis=-1, keepdims=True)
    assert mx.allclose(weights, expected, atol=1e-5).item()


def test_tied_embeddings_drop_a_stray_head() -> None:
    model = _model(tie_word_embeddings=True)
    weights = parameters(model)
    assert "lm_head.weight" not in weights
    head = {"lm_head.weight": weights["model.embed_tokens.weight"]}
    assert_same(model.sanitize({**weights, **head}), weights)
