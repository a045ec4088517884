"""Qwen3.5-MoE specifics: its nested config, its names, its three layouts, its delegation.

The config nests the text model under ``text_config``; every layer is sparse and the router
renormalises whatever the config says; parameters carry mlx-lm's names
(``language_model.model.*``) with Qwen3.5's four DeltaNet projections; sanitize reads the
publisher's multimodal layout (``model.language_model.*``, fused experts, ``model.visual.*``,
``mtp.*``), transformers' flat text-only one and the MLX layout, and is idempotent; the model
protocol is the text model's. Numbers against transformers: the parity fixtures.
"""

from __future__ import annotations

import mlx.core as mx

from moeserve.models.qwen3_5_moe import ModelArgs, SplitDeltaNet
from moeserve.models.registry import canonical_model_type
from tests.unit.models.helpers import QWEN3_5_MOE, QWEN3_NEXT, assert_same, parameters
from tests.unit.models.test_qwen3_next import fused, publisher, with_norms_drawn

_model = QWEN3_5_MOE.model
PREFIX = "language_model."


def nested(**text_over) -> dict:
    """The tiny config in the release's spelling: text_config beside a vision_config."""
    text = {k: v for k, v in QWEN3_5_MOE.config.items() if k != "model_type"}
    return {
        "model_type": "qwen3_5_moe",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "tie_word_embeddings": True,
        "text_config": text | {"model_type": "qwen3_5_moe_text"} | text_over,
        "vision_config": {"depth": 1, "hidden_size": 16},
    }


def test_nested_config_is_read_from_text_config() -> None:
    config = nested(
        tie_word_embeddings=False,  # the top level's says whether the head is tied
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "mrope_section": [2, 1, 1]},
        norm_topk_prob=False,  # not a Qwen3.5 setting: the router always renormalises
        decoder_sparse_step=2,
        mlp_only_layers=[0],
    )
    args = ModelArgs.from_dict(config)
    assert args.model_type == "qwen3_5_moe"
    assert args.hidden_size == 64 and args.num_hidden_layers == 3
    assert args.tie_word_embeddings is True
    assert (args.norm_topk_prob, args.decoder_sparse_step, args.mlp_only_layers) == (True, 1, [])
    assert args.rope.theta == 1e7 and args.rope.partial_rotary_factor == 0.25
    assert args.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    flat = ModelArgs.from_dict(QWEN3_5_MOE.config | {"model_type": "qwen3_5_moe_text"})
    assert flat.hidden_size == 64 and flat.tie_word_embeddings is False


def test_parameters_carry_mlx_lm_names_and_split_projections() -> None:
    model = _model()
    names = parameters(model)
    assert all(n.startswith(("language_model.model.", "language_model.lm_head.")) for n in names)
    mixer = model.layers[0].linear_attn
    assert isinstance(mixer, SplitDeltaNet)
    assert {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"} <= set(mixer)
    assert "in_proj_qkvz" not in mixer
    assert mixer.in_proj_qkv.weight.shape == (2 * 2 * 16 + 4 * 8, 64)
    assert all(hasattr(layer.mlp, "switch_mlp") for layer in model.layers)  # all sparse


def test_sanitize_reads_all_three_layouts_and_is_idempotent() -> None:
    model = _model()
    ours = with_norms_drawn(model)
    text = {k.removeprefix(PREFIX): v for k, v in ours.items()}
    # The release: model.language_model.*, fused experts, a vision tower, MTP layers.
    release = fused(publisher(text), QWEN3_5_MOE.config["num_experts"])
    release = {
        (k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
        for k, v in release.items()
    } | {"model.visual.blocks.0.attn.qkv.weight": mx.zeros((48, 16))}
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in release
    assert_same(model.sanitize(dict(release)), ours)
    # transformers' text-only Qwen3_5MoeForCausalLM: model.*, per-expert or fused.
    assert_same(model.sanitize(publisher(text)), ours)
    # The MLX layout, and sanitizing twice.
    assert_same(model.sanitize(dict(ours)), ours)
    assert_same(model.sanitize(model.sanitize(dict(release))), ours)


def test_the_protocol_is_the_text_models() -> None:
    model = _model()
    ids = mx.array([[3, 17, 42, 8]])
    assert mx.array_equal(model(ids), model.language_model(ids)).item()
    assert model(ids, last_only=True).shape == (1, 1, 96)
    assert model.cache_kinds() == model.language_model.cache_kinds()
    assert model.cache_dtype() == mx.float32
    assert model.make_cache().store.layout.recurrent == [0, 2]
    assert not model.cast_predicate("language_model.model.layers.0.linear_attn.A_log")
    assert model.cast_predicate("language_model.model.layers.0.linear_attn.dt_bias")
    assert model.quant_overrides == QWEN3_NEXT.module.Model.quant_overrides


def test_registry_knows_the_release_and_text_only_names() -> None:
    for name in ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe_text",
                 "Qwen3_5MoeForCausalLM"):  # fmt: skip
        assert canonical_model_type(name) == "qwen3_5_moe"
