"""GLM-4-MoE specifics that the golden-logit parity tests do not pin down.

Config validation and spellings (explicit head_dim, partial rotary default, transformers 5's
rope_parameters), dense-then-MoE layout, sanitize (MTP layers dropped, experts stacked, both
layouts, quantized, idempotent), the float32 router bias, quantization rules, decoding.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from models.errors import ConfigError
from models.glm4_moe import Model, ModelArgs, MoE
from models.layers.mlp import GatedMLP
from models.quantize import quantize_model

E = 8  # routed experts in the tiny config
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


def _config(**over: object) -> dict:
    cfg = {
        "model_type": "glm4_moe",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # wider than hidden_size / heads, as in GLM-4.5
        "n_routed_experts": E,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "use_qk_norm": True,
        "attention_bias": True,
        "num_nextn_predict_layers": 1,
    }
    return cfg | over


def _model(**over: object) -> Model:
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(_config(**over)))
    mx.eval(model.parameters())
    return model


def _params(model: Model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def _to_publisher(params: dict[str, mx.array], mtp_layer: int) -> dict[str, mx.array]:
    """Per-expert tensors, plus an MTP layer at index ``mtp_layer`` as GLM-4.5 ships it."""
    out = {}
    for name, value in params.items():
        if ".switch_mlp." not in name:
            out[name] = value
            continue
        for e in range(value.shape[0]):
            out[name.replace(".switch_mlp.", f".experts.{e}.")] = value[e]
    for name in ("eh_proj.weight", "enorm.weight", "mlp.experts.0.up_proj.weight"):
        out[f"model.layers.{mtp_layer}.{name}"] = mx.zeros((4, 4))
    return out


def _assert_same(got: dict[str, mx.array], want: dict[str, mx.array]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert mx.array_equal(got[name], value).item(), name


def test_from_dict_names_a_missing_key() -> None:
    cfg = _config()
    del cfg["n_routed_experts"]
    with pytest.raises(ConfigError, match="n_routed_experts"):
        ModelArgs.from_dict(cfg)


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
        ModelArgs.from_dict(_config(**over))


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
    ours = _params(model)
    publisher = _to_publisher(ours, mtp_layer=2)
    publisher["model.layers.3.eh_proj.weight"] = mx.zeros((2, 2))  # any index >= n goes
    once = model.sanitize(dict(publisher))
    _assert_same(once, ours)
    _assert_same(model.sanitize(dict(once)), ours)


def test_sanitize_handles_quantized_checkpoints_like_mlx_lm() -> None:
    model = _model()
    quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    ours = _params(model)
    # mlx-lm's router is a bare matrix, never quantized; the experts are.
    assert model.quant_overrides == ()
    assert "model.layers.1.mlp.gate.scales" not in ours
    assert ours["model.layers.1.mlp.gate.weight"].dtype == mx.float32
    assert "model.layers.1.mlp.switch_mlp.gate_proj.scales" in ours
    _assert_same(model.sanitize(_to_publisher(ours, mtp_layer=2)), ours)


def test_router_bias_stays_float32() -> None:
    model = _model()
    assert _params(model)[BIAS].dtype == mx.float32
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
    weights = _params(model)
    assert "lm_head.weight" not in weights
    head = {"lm_head.weight": weights["model.embed_tokens.weight"]}
    _assert_same(model.sanitize({**weights, **head}), weights)


def test_incremental_decoding_matches_the_full_forward() -> None:
    model = _model(num_hidden_layers=2, first_k_dense_replace=1)
    ids = mx.array([[3, 17, 42, 8, 60, 11, 5], [9, 9, 1, 0, 33, 70, 2]])
    full = model(ids)
    cache = model.make_cache()
    steps = [model(ids[:, :4], cache)] + [model(ids[:, t : t + 1], cache) for t in range(4, 7)]
    assert mx.allclose(mx.concatenate(steps, axis=1), full, atol=1e-4).item()
    assert not mx.allclose(model(ids[:, 6:7])[:, 0], full[:, 6], atol=1e-4).item()
