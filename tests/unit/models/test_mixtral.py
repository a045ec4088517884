"""Mixtral specifics that the golden-logit parity tests do not pin down.

The sliding-window checks rest on a property independent of our masks and cache: attention
depends on relative positions only (RoPE), so in a one-layer model the last position's
logits with a window of W must equal those of the last W tokens alone. The router check
compares the paper's formula (softmax over the top-k logits) with transformers' (softmax
over all, top k, renormalise). Sanitize is checked in both layouts, float and quantized. The
missing-key and incremental-decoding checks every family shares are in
``test_model_families.py``.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models.cache import Full, Sliding
from moeserve.models.errors import CheckpointError, ConfigError
from moeserve.models.layers.moe import softmax_topk, topk_softmax
from moeserve.models.quantize import quantize_model
from moeserve.models.registry import canonical_model_type
from tests.unit.models.helpers import MIXTRAL, assert_same, parameters

TINY = MIXTRAL.config
E, K = TINY["num_local_experts"], TINY["num_experts_per_tok"]  # experts, top-k
W = TINY["sliding_window"]
_model = MIXTRAL.model
_PUBLISHER = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _publisher(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our parameters in the Hub's layout: ``block_sparse_moe.experts.{e}.w1/w3/w2``."""
    out = {}
    for name, value in params.items():
        if ".switch_mlp." not in name:
            out[name] = value
            continue
        prefix, rest = name.split(".switch_mlp.")
        proj, part = rest.split(".")
        for e in range(value.shape[0]):
            out[f"{prefix}.experts.{e}.{_PUBLISHER[proj]}.{part}"] = value[e]
    return out


def test_from_dict_defaults_and_rejections() -> None:
    args = MIXTRAL.args(head_dim=None)
    assert args.head_dim == TINY["hidden_size"] // TINY["num_attention_heads"]
    assert args.rope.theta == 1e6  # transformers' Mixtral default, not 1e4
    for over in ({"num_experts_per_tok": E + 1}, {"sliding_window": 0}, {"hidden_act": "gelu"}):
        with pytest.raises(ConfigError):
            MIXTRAL.args(**over)
    assert canonical_model_type("MixtralForCausalLM") == "mixtral"


@pytest.mark.parametrize(
    ("over", "kind"),
    [
        ({}, Sliding(2, 32, sliding_window=W)),
        ({"sliding_window": None}, Full(2, 32)),
        ({"sliding_window": 4096, "max_position_embeddings": 4096}, Full(2, 32)),
    ],
)
def test_cache_kind_follows_the_sliding_window(over: dict, kind: Full) -> None:
    assert _model(**over).cache_kinds() == [kind] * TINY["num_hidden_layers"]


def test_window_makes_one_layer_see_only_the_last_w_tokens() -> None:
    model = _model(num_hidden_layers=1)
    ids = mx.array([[3, 17, 42, 8, 60, 11, 5, 29]])
    suffix = model(ids[:, -W:])[:, -1]  # the last W tokens alone, at positions 0..W-1
    assert mx.allclose(model(ids)[:, -1], suffix, atol=1e-5).item()  # stateless pass
    cache = model.make_cache()
    model(ids[:, :5], cache=cache)  # then decode through the sliding cache
    steps = [model(ids[:, t : t + 1], cache=cache) for t in range(5, ids.shape[1])]
    assert mx.allclose(steps[-1][:, -1], suffix, atol=1e-5).item()
    # Without the window the earlier tokens matter: the check above is not vacuous.
    unwindowed = _model(num_hidden_layers=1, sliding_window=None)
    assert not mx.allclose(unwindowed(ids)[:, -1], suffix, atol=1e-3).item()


def test_router_is_the_papers_softmax_over_the_top_k_logits() -> None:
    logits = mx.random.normal((64, E), key=mx.random.key(7))
    inds, weights = topk_softmax(logits, K)
    ref_inds, ref_weights = softmax_topk(logits, K, renormalize_p=1.0)  # transformers' order
    order, ref_order = mx.argsort(inds, axis=-1), mx.argsort(ref_inds, axis=-1)
    take = mx.take_along_axis
    assert mx.array_equal(take(inds, order, -1), take(ref_inds, ref_order, -1)).item()
    assert mx.allclose(take(weights, order, -1), take(ref_weights, ref_order, -1)).item()


def test_sanitize_stacks_publisher_experts_and_is_idempotent() -> None:
    model = _model()
    ours = parameters(model)
    publisher = _publisher(ours)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in publisher
    assert "model.layers.1.block_sparse_moe.gate.weight" in publisher
    once = model.sanitize(dict(publisher))
    assert_same(once, ours)
    assert_same(model.sanitize(dict(once)), ours)  # the MLX layout passes through


def test_sanitize_maps_w1_to_gate_and_w3_to_up() -> None:
    model = _model()
    publisher = _publisher(parameters(model))
    w1 = publisher["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
    w3 = publisher["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    stacked = model.sanitize(publisher)
    prefix = "model.layers.0.block_sparse_moe.switch_mlp"
    assert mx.array_equal(stacked[f"{prefix}.gate_proj.weight"][2], w1).item()
    assert mx.array_equal(stacked[f"{prefix}.up_proj.weight"][2], w3).item()


def test_sanitize_stacks_quantized_per_expert_tensors() -> None:
    model = _model()
    quantize_model(model, bits=4, group_size=64)
    ours = parameters(model)
    assert "model.layers.0.block_sparse_moe.switch_mlp.down_proj.biases" in ours
    assert_same(model.sanitize(_publisher(ours)), ours)


def test_sanitize_rejects_a_layer_with_missing_experts() -> None:
    model = _model()
    publisher = _publisher(parameters(model))
    del publisher["model.layers.1.block_sparse_moe.experts.0.w3.weight"]
    with pytest.raises(CheckpointError, match="experts"):
        model.sanitize(publisher)
