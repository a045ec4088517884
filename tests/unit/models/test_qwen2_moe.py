"""Qwen2-MoE specifics that the golden-logit parity tests do not pin down.

Layer layout (decoder_sparse_step / mlp_only_layers), config validation, tied embeddings,
sanitize in both layouts (float and quantized) and its idempotence. The missing-key and
incremental-decoding checks every family shares are in ``test_model_families.py``.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models.errors import CheckpointError, ConfigError
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.quantize import quantize_model
from moeserve.models.qwen2_moe import SparseMoeBlock
from tests.unit.models.helpers import QWEN2_MOE, assert_same, parameters, unstack_experts

E = QWEN2_MOE.config["num_experts"]  # routed experts in the tiny config
EMBED = "model.embed_tokens.weight"
_model = QWEN2_MOE.model


@pytest.mark.parametrize(
    "over",
    [{"use_sliding_window": True}, {"decoder_sparse_step": 0}, {"num_experts_per_tok": E + 1}],
)
def test_from_dict_rejects_unsupported_settings(over: dict) -> None:
    with pytest.raises(ConfigError):
        QWEN2_MOE.args(**over)


def test_sparse_step_and_mlp_only_layers_pick_the_dense_layers() -> None:
    # transformers' rule: sparse iff not in mlp_only_layers and (i + 1) % step == 0.
    model = _model(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    sparse = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, SparseMoeBlock)]
    assert sparse == [1, 5]
    dense = model.layers[3].mlp
    assert isinstance(dense, GatedMLP)
    assert dense.gate_proj.weight.shape == (96, 64)  # intermediate_size, not the expert width


def test_qkv_bias_follows_the_config() -> None:
    assert "bias" in _model().layers[0].self_attn.q_proj
    assert "bias" not in _model(qkv_bias=False).layers[0].self_attn.q_proj
    assert "bias" not in _model().layers[0].self_attn.o_proj


def test_sanitize_stacks_publisher_experts_and_is_idempotent() -> None:
    model = _model()
    ours = parameters(model)
    publisher = unstack_experts(ours)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in publisher
    once = model.sanitize(dict(publisher))
    assert_same(once, ours)
    assert_same(model.sanitize(dict(once)), ours)  # the MLX layout passes through


def test_sanitize_stacks_quantized_per_expert_tensors() -> None:
    model = _model()
    quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    ours = parameters(model)
    assert "model.layers.0.mlp.switch_mlp.up_proj.scales" in ours
    assert_same(model.sanitize(unstack_experts(ours)), ours)


def test_sanitize_rejects_a_layer_with_missing_experts() -> None:
    model = _model()
    publisher = unstack_experts(parameters(model))
    del publisher["model.layers.0.mlp.experts.2.gate_proj.weight"]
    with pytest.raises(CheckpointError, match="experts"):
        model.sanitize(publisher)


def test_tied_embeddings_reuse_the_embedding_as_head() -> None:
    tied, untied = _model(tie_word_embeddings=True), _model()
    assert "lm_head.weight" not in parameters(tied)
    weights = parameters(tied)
    # A checkpoint that also carries a head copy loads: sanitize drops it.
    cleaned = tied.sanitize({**weights, "lm_head.weight": weights[EMBED]})
    assert_same(cleaned, weights)
    untied.load_weights([*weights.items(), ("lm_head.weight", weights[EMBED])])
    ids = mx.array([[1, 5, 9, 2]])
    assert mx.allclose(tied(ids), untied(ids), atol=1e-5).item()


def test_quantization_and_cast_rules() -> None:
    model = _model()
    assert model.quant_overrides == ()  # mlx-lm's practice: uniform precision
    assert all(model.cast_predicate(name) for name in parameters(model))
