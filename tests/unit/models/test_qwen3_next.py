"""Qwen3-Next specifics that the golden-logit parity tests do not pin down.

Layer plan (``layer_types`` or ``full_attention_interval``; dense layers), the cache kinds it
declares, config validation, the gated attention's shape, sanitize of every layout (the
publisher's per-expert one with ``[C, 1, K]`` convolutions, zero-centred norms and ``mtp.*``;
transformers 5's fused experts; the MLX layout, float and quantized) and its idempotence,
tied embeddings, quantization and cast rules. Shared checks: ``test_model_families.py``;
the DeltaNet layer itself: ``test_gated_delta.py``.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models.cache import Full, Recurrent
from moeserve.models.errors import ConfigError
from moeserve.models.layers.gated_delta import GatedDeltaNet
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.quantize import quantize_model
from moeserve.models.qwen2_moe import SparseMoeBlock
from moeserve.models.qwen3_next import ZERO_CENTRED
from moeserve.models.registry import canonical_model_type
from tests.unit.models.helpers import QWEN3_NEXT, assert_same, parameters, unstack_experts

LIN, FULL = "linear_attention", "full_attention"
_model = QWEN3_NEXT.model


def with_norms_drawn(model) -> dict[str, mx.array]:
    """The model's parameters with its ``1 + w`` norms set to exact random values."""
    mx.random.seed(5)
    for name, value in parameters(model).items():
        if name.endswith(ZERO_CENTRED):
            w = mx.round(mx.random.normal(value.shape) * 0.1 * 512) / 512
            model.load_weights([(name, 1.0 + w)], strict=False)
    return parameters(model)


def publisher(params: dict[str, mx.array], prefix: str = "") -> dict[str, mx.array]:
    """The publisher's layout of MLX-layout tensors.

    Per-expert tensors, ``[C, 1, K]`` convolutions, zero-centred norms (``w``, not
    ``1 + w``), names under ``prefix``, and ``mtp.*`` tensors beside them.
    """
    out = {}
    for name, value in unstack_experts(params).items():
        if name.endswith("conv1d.weight"):
            value = mx.moveaxis(value, 1, 2)
        elif name.endswith(ZERO_CENTRED):
            value = value - 1.0
        out[prefix + name] = value
    return out | {"mtp.fc.weight": mx.zeros((4, 8)), "mtp.layers.0.mlp.gate.weight": mx.zeros((2,))}


def fused(publisher_params: dict[str, mx.array], num_experts: int) -> dict[str, mx.array]:
    """The fused experts of transformers 5 (``gate_up_proj`` [E, 2F, M], ``down_proj``)."""
    out = dict(publisher_params)
    layers = {k.split(".experts.")[0] for k in out if ".experts.0.gate_proj.weight" in k}
    for p in layers:
        take = [[out.pop(f"{p}.experts.{e}.{n}.weight") for e in range(num_experts)] for n in
                ("gate_proj", "up_proj", "down_proj")]  # fmt: skip
        gate, up, down = (mx.stack(t) for t in take)
        out[f"{p}.experts.gate_up_proj"] = mx.concatenate([gate, up], axis=1)
        out[f"{p}.experts.down_proj"] = down
    return out


def test_layer_plan_follows_layer_types_or_the_interval() -> None:
    assert QWEN3_NEXT.args().layer_types == [LIN, FULL, LIN, FULL]
    assert QWEN3_NEXT.args(full_attention_interval=4).layer_types == [LIN, LIN, LIN, FULL]
    plan = [FULL, LIN, LIN, LIN]
    model = _model(layer_types=plan)
    assert QWEN3_NEXT.args(layer_types=plan).layer_types == plan  # the list wins
    mixers = [type(layer["linear_attn" if "linear_attn" in layer else "self_attn"]) for layer in
              model.layers]  # fmt: skip
    assert mixers[0].__name__ == "Attention" and mixers[1:] == [GatedDeltaNet] * 3
    kinds = model.cache_kinds()
    assert kinds[0] == Full(2, 32)
    assert kinds[1] == Recurrent(((3, 2 * 2 * 16 + 4 * 8), (4, 16, 8)))


def test_dense_layers_follow_mlp_only_layers_and_the_sparse_step() -> None:
    model = _model(decoder_sparse_step=2, mlp_only_layers=[3])
    sparse = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, SparseMoeBlock)]
    assert sparse == [1]
    assert isinstance(model.layers[0].mlp, GatedMLP)


@pytest.mark.parametrize(
    "over",
    [
        {"layer_types": [LIN, FULL]},  # 2 names for 4 layers
        {"layer_types": [LIN, FULL, "sliding_attention", FULL]},
        {"linear_num_value_heads": 3},  # not a multiple of the 2 key heads
        {"linear_conv_kernel_dim": 1},
        {"hidden_act": "gelu"},
        {"decoder_sparse_step": 0},
        {"num_experts_per_tok": 5},
    ],
)
def test_from_dict_rejects_unsupported_settings(over: dict) -> None:
    with pytest.raises(ConfigError):
        QWEN3_NEXT.args(**over)


def test_full_attention_layers_have_the_gate_qk_norm_and_a_partial_rotary() -> None:
    attention = _model().layers[1].self_attn
    assert attention.q_proj.weight.shape == (2 * 4 * 32, 64)  # queries and their gates
    assert attention.o_proj.weight.shape == (64, 4 * 32)
    assert "q_norm" in attention and "k_norm" in attention
    assert attention.rope.dims == 8  # a quarter of 32
    assert "bias" in _model(attention_bias=True).layers[1].self_attn.o_proj


def test_sanitize_reads_the_publisher_layout_and_is_idempotent() -> None:
    model = _model()
    ours = with_norms_drawn(model)
    pub = publisher(ours)
    assert pub["model.layers.0.linear_attn.conv1d.weight"].shape == (96, 1, 4)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in pub
    once = model.sanitize(dict(pub))
    assert_same(once, ours)
    assert_same(model.sanitize(dict(once)), ours)  # the MLX layout passes through


def test_sanitize_reads_transformers_fused_experts() -> None:
    model = _model()
    ours = with_norms_drawn(model)
    assert_same(model.sanitize(fused(publisher(ours), 4)), ours)


def test_sanitize_passes_a_quantized_mlx_checkpoint_through() -> None:
    model = _model()
    quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    ours = parameters(model)
    assert "model.layers.1.mlp.switch_mlp.up_proj.scales" in ours
    assert "model.layers.0.linear_attn.in_proj_qkvz.scales" in ours
    assert_same(model.sanitize(dict(ours)), ours)


def test_sanitize_tells_layouts_apart_without_deltanet_layers() -> None:
    # No convolution to look at: per-expert tensors mean the publisher's layout.
    model = _model(layer_types=[FULL] * 4)
    ours = with_norms_drawn(model)
    assert_same(model.sanitize(publisher(ours)), ours)
    assert_same(model.sanitize(dict(ours)), ours)


def test_tied_embeddings_drop_a_saved_head() -> None:
    model = _model(tie_word_embeddings=True)
    ours = parameters(model)
    assert "lm_head.weight" not in ours
    head = ours["model.embed_tokens.weight"]
    assert_same(model.sanitize({**ours, "lm_head.weight": head}), ours)


def test_quantization_cast_and_registry() -> None:
    model = _model()
    quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    assert model.layers[1].mlp.gate.bits == 8
    assert model.layers[1].mlp.shared_expert_gate.bits == 8
    assert model.layers[1].mlp.switch_mlp.up_proj.bits == 4
    names = parameters(_model())
    kept = sorted(n for n in names if not model.cast_predicate(n))
    assert kept == ["model.layers.0.linear_attn.A_log", "model.layers.2.linear_attn.A_log"]
    assert canonical_model_type("Qwen3NextForCausalLM") == "qwen3_next"
