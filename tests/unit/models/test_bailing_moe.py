"""Bailing-MoE specifics that the golden-logit parity tests do not pin down.

``norm_head`` (unit-norm head columns, float32, never applied to a quantized head), the
router rename ``mlp.gate.weight`` -> ``mlp.gate.gate_proj.weight``, sanitize in both layouts
and its idempotence, the 8-bit router override, the float32 ``expert_bias``, ``rotary_dim``,
config validation. The missing-key and incremental-decoding checks every family shares are in
``test_model_families.py``.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models.bailing_moe import SparseMoeBlock
from moeserve.models.errors import ConfigError
from moeserve.models.quantize import quantize_model
from tests.unit.models.helpers import BAILING_MOE, assert_same, parameters, unstack_experts

ROUTER = "model.layers.1.mlp.gate.gate_proj"
_model = BAILING_MOE.model


def _to_publisher(params: dict[str, mx.array], router: bool = True) -> dict[str, mx.array]:
    """Per-expert tensors and (float only) the router under its publisher name ``mlp.gate``."""
    out = unstack_experts(params)
    if not router:
        return out
    return {k.replace(".mlp.gate.gate_proj.weight", ".mlp.gate.weight"): v for k, v in out.items()}


@pytest.mark.parametrize(
    "over",
    [
        {"tie_word_embeddings": True},  # with norm_head: the publisher would normalise both
        {"score_function": "relu"},
        {"n_group": 3},
        {"num_experts_per_tok": 5},  # only 4 experts survive keeping 1 of 2 groups
    ],
)
def test_from_dict_rejects_unsupported_or_inconsistent_settings(over: dict) -> None:
    with pytest.raises(ConfigError):
        BAILING_MOE.args(**over)


def test_norm_head_gives_unit_columns_in_float32() -> None:
    model = _model()
    raw = (3.0 * mx.random.normal((96, 64))).astype(mx.float16)
    out = model.sanitize({"lm_head.weight": raw})["lm_head.weight"]
    assert out.dtype == mx.float32  # no rounding back to the checkpoint's half precision
    norms = mx.linalg.norm(out, axis=0)  # one norm per hidden dimension, over the vocabulary
    assert mx.allclose(norms, mx.ones((64,)), atol=1e-5).item()
    # Each column is only rescaled: the direction is the raw column's.
    scale = out[0] / raw[0].astype(mx.float32)
    assert mx.allclose(out, raw.astype(mx.float32) * scale, atol=1e-5).item()


def test_sanitize_publisher_layout_and_idempotence() -> None:
    model = _model()
    ours = parameters(model)
    publisher = _to_publisher(ours)
    assert "model.layers.1.mlp.gate.weight" in publisher
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in publisher
    once = model.sanitize(dict(publisher))
    raw_head = publisher["lm_head.weight"]
    norm = mx.linalg.norm(raw_head, axis=0, keepdims=True) + 1e-7
    assert_same(once, ours | {"lm_head.weight": raw_head / norm}, atol=1e-6)
    assert_same(model.sanitize(dict(once)), once, atol=1e-6)  # normalising twice: a no-op


def test_quantized_checkpoint_keeps_its_head_and_router_precision() -> None:
    model = _model()
    assert model.quant_overrides[0].suffixes == ("mlp.gate.gate_proj",)
    config = quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    assert config[ROUTER] == {"group_size": 64, "bits": 8}
    layer1 = model.layers[1].mlp
    assert (layer1.gate.gate_proj.bits, layer1.switch_mlp.up_proj.bits) == (8, 4)
    assert model.layers[0].mlp.gate_proj.bits == 4  # the dense MLP is not mistaken for a router
    ours = parameters(model)
    # The packed head is passed through bit for bit (normalising it would destroy it).
    assert_same(model.sanitize(dict(ours)), ours)
    assert_same(model.sanitize(_to_publisher(ours, router=False)), ours)


def test_expert_bias_stays_float32_and_only_exists_when_enabled() -> None:
    model = _model()
    name = "model.layers.1.mlp.gate.expert_bias"
    assert parameters(model)[name].dtype == mx.float32
    assert not model.cast_predicate(name)
    assert model.cast_predicate(f"{ROUTER}.weight")
    plain = parameters(_model(moe_router_enable_expert_bias=False))
    assert not any(k.endswith("expert_bias") for k in plain)


def test_attention_and_mlp_names_and_biases() -> None:
    model = _model(use_bias=True)
    attn = model.layers[0].attention
    assert "bias" in attn.query_key_value and "bias" in attn.dense
    assert attn.query_layernorm.weight.shape == (16,)
    assert "bias" in model.layers[0].mlp.up_proj  # use_bias reaches the dense MLP ...
    assert "bias" in model.layers[1].mlp.switch_mlp.up_proj  # ... and the experts
    assert isinstance(model.layers[1].mlp, SparseMoeBlock)


def test_shared_expert_width_and_switch() -> None:
    wide = _model(num_shared_experts=2, moe_shared_expert_intermediate_size=48)
    assert wide.layers[1].mlp.shared_experts.up_proj.weight.shape == (96, 64)
    assert _model(num_shared_experts=0).layers[1].mlp.shared_experts is None
    off = _model(moe_router_enable_shared_expert=False)
    assert off.layers[1].mlp.shared_experts is None


@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(16, 8), (44, 30)])
def test_rotary_dim_wins_over_partial_factor(head_dim: int, rotary_dim: int) -> None:
    # 44 * (30 / 44) rounds to 29.999...: the factor must still land on 30 channels.
    model = _model(head_dim=head_dim, rotary_dim=rotary_dim)
    assert model.layers[0].attention.rope.dims == rotary_dim


def test_tied_embeddings_without_norm_head() -> None:
    model = _model(tie_word_embeddings=True, norm_head=False)
    weights = parameters(model)
    assert "lm_head.weight" not in weights
    head = {"lm_head.weight": weights["model.word_embeddings.weight"]}
    assert_same(model.sanitize({**weights, **head}), weights)
