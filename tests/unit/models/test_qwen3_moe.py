"""Qwen3-MoE specifics that the golden-logit parity tests do not pin down.

Config validation, the explicit head width and per-head qk-norm, what ``norm_topk_prob``
changes (derived from the fact that expert mixing is linear in the weights), the dense/sparse
layer rule, sanitize in both layouts (float and quantized) and its idempotence, tied
embeddings and the router's 8-bit quantization. The missing-key and incremental-decoding
checks every family shares are in ``test_model_families.py``.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models.cache import Full
from moeserve.models.errors import CheckpointError, ConfigError
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.layers.moe import QuantizedSwitchLinear
from moeserve.models.quantize import quantize_model
from moeserve.models.qwen3_moe import SparseMoeBlock
from moeserve.models.registry import canonical_model_type
from tests.unit.models.helpers import QWEN3_MOE, assert_same, parameters, unstack_experts

TINY = QWEN3_MOE.config
E, K = TINY["num_experts"], TINY["num_experts_per_tok"]  # experts, top-k
D = TINY["head_dim"]
EMBED = "model.embed_tokens.weight"
_model = QWEN3_MOE.model


@pytest.mark.parametrize(
    "over",
    [
        {"use_sliding_window": True},
        {"decoder_sparse_step": 0},
        {"num_experts_per_tok": E + 1},
        {"hidden_act": "gelu"},
    ],
)
def test_from_dict_rejects_unsupported_settings(over: dict) -> None:
    with pytest.raises(ConfigError):
        QWEN3_MOE.args(**over)


def test_the_architectures_name_resolves() -> None:
    assert canonical_model_type("Qwen3MoeForCausalLM") == "qwen3_moe"


def test_explicit_head_dim_sizes_projections_norms_and_cache() -> None:
    model = _model()
    attn = model.layers[0].self_attn
    H, KV, M = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["hidden_size"]
    assert D != M // H  # the config really overrides the implied width
    assert attn.q_proj.weight.shape == (H * D, M)
    assert attn.o_proj.weight.shape == (M, H * D)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (D,)  # per head, not per M
    assert model.cache_kinds() == [Full(KV, D)] * TINY["num_hidden_layers"]
    # attention_bias puts biases on all four projections; without it there are none
    assert all("bias" in getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    plain = _model(attention_bias=False).layers[0].self_attn
    assert not any("bias" in getattr(plain, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_qk_norm_weights_move_the_logits() -> None:
    model = _model()
    ids = mx.array([[1, 5, 9, 2, 7]])
    before = model(ids)
    norm = model.layers[0].self_attn.k_norm
    norm.weight = norm.weight * 3.0  # sharper keys: a different attention pattern
    assert not mx.allclose(model(ids), before, atol=1e-3).item()


def test_norm_topk_prob_divides_by_the_kept_probability_mass() -> None:
    # Mixing is linear in the weights, so the unnormalised block's output is the normalised
    # one times the probability mass of the k kept experts.
    normed = _model().layers[0].mlp
    raw = _model(norm_topk_prob=False).layers[0].mlp
    assert isinstance(normed, SparseMoeBlock) and isinstance(raw, SparseMoeBlock)
    x = mx.random.normal((5, TINY["hidden_size"]), key=mx.random.key(3))
    probs = mx.softmax(normed.gate(x), axis=-1)  # [T, E]
    kept = mx.sort(probs, axis=-1)[:, -K:].sum(axis=-1, keepdims=True)  # [T, 1]
    assert mx.all(kept < 0.999).item()  # otherwise the check below proves nothing
    assert mx.allclose(raw(x), normed(x) * kept, atol=1e-5).item()


def test_sparse_step_and_mlp_only_layers_pick_the_dense_layers() -> None:
    # transformers' rule: sparse iff not in mlp_only_layers and (i + 1) % step == 0.
    model = _model(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    sparse = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, SparseMoeBlock)]
    assert sparse == [1, 5]
    dense = model.layers[3].mlp
    assert isinstance(dense, GatedMLP)
    assert dense.gate_proj.weight.shape == (TINY["intermediate_size"], TINY["hidden_size"])


def test_sanitize_stacks_publisher_experts_and_is_idempotent() -> None:
    model = _model()
    ours = parameters(model)
    publisher = unstack_experts(ours)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in publisher
    assert "model.layers.1.mlp.gate.weight" in publisher  # the router keeps its name
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
    weights = parameters(tied)
    assert "lm_head.weight" not in weights
    cleaned = tied.sanitize({**weights, "lm_head.weight": weights[EMBED]})
    assert_same(cleaned, weights)
    untied.load_weights([*weights.items(), ("lm_head.weight", weights[EMBED])])
    ids = mx.array([[1, 5, 9, 2]])
    assert mx.allclose(tied(ids), untied(ids), atol=1e-5).item()


def test_quantization_keeps_the_router_at_8_bits() -> None:
    # As mlx-lm's qwen3_moe predicate does, so converted checkpoints match mlx-community's.
    model = _model()
    quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    block = model.layers[0].mlp
    assert (block.gate.bits, block.gate.group_size) == (8, 64)
    assert isinstance(block.switch_mlp.gate_proj, QuantizedSwitchLinear)
    assert block.switch_mlp.gate_proj.bits == 4
    assert model.layers[0].self_attn.q_proj.bits == 4
