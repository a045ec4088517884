"""DBRX specifics that the golden parity test does not pin down on its own.

Expected values are derived independently: the publisher's fused expert tensors are built
from our parameters following transformers' description (``w1``/``v1``/``w2`` each
``[E*F, M]``, ``w2`` applied as ``x @ w2``), mlx-lm's per-expert layout following its
``sanitize``, and the MoE reference is a per-token loop over those fused tensors.

The missing-key and incremental-decoding checks every family shares are in
``test_model_families.py``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moeserve.models.dbrx import Model, ModelArgs
from moeserve.models.errors import CheckpointError, ConfigError
from moeserve.models.quantize import quantize_model
from tests.unit.models.helpers import DBRX, assert_same, parameters

TINY = DBRX.config
E, K = TINY["ffn_config"]["moe_num_experts"], TINY["ffn_config"]["moe_top_k"]  # experts, top-k
F, M = TINY["ffn_config"]["ffn_hidden_size"], TINY["d_model"]  # expert width, d_model
LAYERS = TINY["n_layers"]
PROJ = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}


def _model(**ffn) -> Model:
    return DBRX.model(ffn_config=TINY["ffn_config"] | ffn)


def _stacked(params: dict[str, mx.array], i: int, name: str) -> mx.array:
    return params.pop(f"transformer.blocks.{i}.ffn.switch_mlp.{PROJ[name]}.weight")


def _publisher(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our parameters in Databricks' layout: each expert tensor fused to ``[E*F, M]``."""
    out = dict(params)
    for i in range(LAYERS):
        for name in PROJ:
            w = _stacked(out, i, name)  # [E, F, M], or [E, M, F] for the down projection
            w = w.swapaxes(1, 2) if name == "w2" else w
            out[f"transformer.blocks.{i}.ffn.experts.mlp.{name}"] = w.reshape(E * F, M)
    return out


def _mlx_lm(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our parameters in mlx-lm's layout: one ``nn.Linear`` per expert (w2 as ``[M, F]``)."""
    out = dict(params)
    for i in range(LAYERS):
        for name in PROJ:
            w = _stacked(out, i, name)
            for e in range(E):
                out[f"transformer.blocks.{i}.ffn.experts.{e}.{name}.weight"] = w[e]
    return out


def test_from_dict_reads_the_nested_configs() -> None:
    args = ModelArgs.from_dict(TINY)
    assert (args.kv_n_heads, args.clip_qkv, args.rope_theta) == (2, 0.5, 500000.0)
    assert (args.ffn_hidden_size, args.moe_num_experts, args.moe_top_k) == (F, E, K)
    assert args.moe_normalize_expert_weights == 1.0  # transformers' default


def test_from_dict_rejects_other_activations() -> None:
    bad = TINY | {"ffn_config": TINY["ffn_config"] | {"ffn_act_fn": {"name": "gelu"}}}
    with pytest.raises(ConfigError, match="gelu"):
        ModelArgs.from_dict(bad)


def test_nested_rope_theta_wins_over_a_transformers5_default() -> None:
    # transformers 5 writes rope_parameters with its default base and ignores attn_config's.
    cfg = TINY | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert ModelArgs.from_dict(cfg).rope.theta == 500000.0


def test_sanitize_publisher_fused_experts() -> None:
    model = _model()
    params = parameters(model)
    assert_same(model.sanitize(_publisher(params)), params)


def test_sanitize_mlx_lm_per_expert_layout_and_idempotence() -> None:
    model = _model()
    params = parameters(model)
    once = model.sanitize(_mlx_lm(params))
    twice = model.sanitize(dict(once))
    assert once.keys() == twice.keys() == params.keys()
    assert_same(twice, params)


def test_sanitize_stacks_quantized_per_expert_linears() -> None:
    weights = {}
    for e in range(E):
        q = nn.QuantizedLinear.from_linear(nn.Linear(M, F, bias=False), group_size=64, bits=4)
        for part in ("weight", "scales", "biases"):
            weights[f"transformer.blocks.0.ffn.experts.{e}.w1.{part}"] = q[part]
    out = _model().sanitize(dict(weights))
    for part in ("weight", "scales", "biases"):
        stacked = out[f"transformer.blocks.0.ffn.switch_mlp.gate_proj.{part}"]
        assert stacked.shape == (E, *weights[f"transformer.blocks.0.ffn.experts.0.w1.{part}"].shape)
        assert mx.array_equal(
            stacked[E - 1], weights[f"transformer.blocks.0.ffn.experts.3.w1.{part}"]
        )
    assert not any(".experts." in k for k in out)


def test_sanitize_names_a_missing_expert() -> None:
    params = _mlx_lm(parameters(_model()))
    del params["transformer.blocks.1.ffn.experts.2.v1.weight"]
    with pytest.raises(CheckpointError, match="experts"):
        _model().sanitize(params)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("p", [1.0, 2.0, None])
def test_moe_block_matches_a_per_token_reference(p: float | None) -> None:
    model = _model(moe_normalize_expert_weights=p)
    pub = {k: np.array(v) for k, v in _publisher(parameters(model)).items()}
    x = mx.random.normal((2, 5, M), key=mx.random.key(2))
    got = np.array(model.layers[0].ffn(x)).reshape(-1, M)
    router = pub["transformer.blocks.0.ffn.router.layer.weight"]  # [E, M]
    w1, v1, w2 = (pub[f"transformer.blocks.0.ffn.experts.mlp.{n}"].reshape(E, F, M) for n in PROJ)
    for t, xt in enumerate(np.array(x).reshape(-1, M)):
        probs = np.exp(router @ xt)
        probs /= probs.sum()  # softmax over all experts ...
        top = np.argsort(-probs)[:K]  # ... then the k most probable
        w = probs[top] if p is None else probs[top] / np.sum(probs[top] ** p) ** (1 / p)
        want = sum(we * ((_silu(w1[e] @ xt) * (v1[e] @ xt)) @ w2[e]) for e, we in zip(top, w))
        np.testing.assert_allclose(got[t], want, atol=1e-5)


def test_block_is_pre_norm_attention_then_moe_on_norm_2() -> None:
    # With a zero attention output the block must reduce to x + ffn(norm_2(x)).
    model = _model()
    layer = model.layers[0]
    layer.norm_attn_norm.attn.out_proj.weight = mx.zeros((M, M))
    x = mx.random.normal((1, 3, M), key=mx.random.key(3))
    normed = mx.fast.layer_norm(x, layer.norm_attn_norm.norm_2.weight, None, 1e-5)
    assert mx.allclose(layer(x, "causal", None), x + layer.ffn(normed), atol=1e-5)


def test_attention_is_configured_with_clipping_and_dbrx_names() -> None:
    attn = _model().layers[0].norm_attn_norm.attn
    assert attn.cfg.clip_qkv == 0.5 and attn.cfg.head_dim == M // 4
    assert {"Wqkv", "out_proj"} <= set(attn.children())


def test_quant_overrides_keep_the_router_at_8_bits() -> None:
    model = _model()
    (override,) = model.quant_overrides
    assert override.suffixes == ("ffn.router.layer",) and override.bits == 8
    quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    assert model.layers[1].ffn.router.layer.bits == 8
    assert model.layers[1].ffn.switch_mlp.down_proj.bits == 4


def test_cast_predicate_casts_everything() -> None:
    model = _model()
    assert all(model.cast_predicate(k) for k in parameters(model))
