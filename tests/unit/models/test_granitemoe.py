"""GraniteMoE specifics that the golden parity test does not pin down on its own.

The expected values here are derived independently: the MoE reference is a per-token loop
written from transformers' description of the publisher tensors (``input_linear`` rows are
gate then up), and the multiplier test uses the fact that a zero residual multiplier turns
every layer into the identity.

The missing-key and incremental-decoding checks every family shares are in
``test_model_families.py``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models.errors import ConfigError
from moeserve.models.granitemoe import ModelArgs
from moeserve.models.quantize import quantize_model
from tests.unit.models.helpers import GRANITEMOE, assert_same, parameters

TINY = GRANITEMOE.config
E, K = TINY["num_local_experts"], TINY["num_experts_per_tok"]  # experts, top-k
F, M, V = TINY["intermediate_size"], TINY["hidden_size"], TINY["vocab_size"]  # widths, vocab
_model = GRANITEMOE.model


def _publisher(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our parameters rewritten in IBM's layout: experts fused as input/output_linear."""
    out = dict(params)
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}.block_sparse_moe"
        gate = out.pop(f"{p}.switch_mlp.gate_proj.weight")
        up = out.pop(f"{p}.switch_mlp.up_proj.weight")
        out[f"{p}.input_linear.weight"] = mx.concatenate([gate, up], axis=1)  # [E, 2F, M]
        out[f"{p}.output_linear.weight"] = out.pop(f"{p}.switch_mlp.down_proj.weight")
    return out


def test_from_dict_fills_derived_defaults_and_rejects_other_activations() -> None:
    args = ModelArgs.from_dict({k: v for k, v in TINY.items() if k != "num_key_value_heads"})
    assert args.num_key_value_heads == 4 and args.head_dim == M // 4
    with pytest.raises(ConfigError, match="hidden_act"):
        GRANITEMOE.args(hidden_act="gelu")


def test_both_rope_spellings_agree() -> None:
    old = GRANITEMOE.args(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    new = GRANITEMOE.args(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    assert old.rope == new.rope
    assert (old.rope.theta, old.rope.rope_type, old.rope.scaling) == (
        5e5,
        "linear",
        {"factor": 2.0},
    )


def test_sanitize_splits_publisher_experts_gate_first() -> None:
    model = _model()
    params = parameters(model)
    assert_same(model.sanitize(_publisher(params)), params)


def test_sanitize_passes_mlx_layout_through_and_is_idempotent() -> None:
    model = _model(tie_word_embeddings=False)
    params = parameters(model)
    once = model.sanitize(dict(params))
    twice = model.sanitize(dict(once))
    assert once.keys() == twice.keys() == params.keys()
    assert_same(twice, params)


def test_sanitize_drops_a_duplicate_head_only_when_tied() -> None:
    head = {"lm_head.weight": mx.zeros((V, M))}
    assert "lm_head.weight" not in _model().sanitize(dict(head))
    assert "lm_head.weight" in _model(tie_word_embeddings=False).sanitize(dict(head))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def test_moe_block_matches_a_per_token_reference() -> None:
    model = _model()
    pub = _publisher(parameters(model))
    block = model.layers[0].block_sparse_moe
    x = mx.random.normal((2, 5, M), key=mx.random.key(1))
    got = np.array(block(x.reshape(-1, M)))  # the block sees flattened tokens [T, M]
    router = np.array(pub["model.layers.0.block_sparse_moe.router.layer.weight"])  # [E, M]
    fused = np.array(pub["model.layers.0.block_sparse_moe.input_linear.weight"])  # [E, 2F, M]
    down = np.array(pub["model.layers.0.block_sparse_moe.output_linear.weight"])  # [E, M, F]
    for t, xt in enumerate(np.array(x).reshape(-1, M)):
        logits = router @ xt
        top = np.argsort(-logits)[:K]  # keep the k largest logits ...
        w = np.exp(logits[top] - logits[top].max())
        w /= w.sum()  # ... and softmax over only those
        want = np.zeros(M)
        for e, we in zip(top, w):
            gate, up = np.split(fused[e] @ xt, 2)  # publisher rows: gate first, then up
            want += we * (down[e] @ (_silu(gate) * up))
        np.testing.assert_allclose(got[t], want, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_multipliers_with_identity_layers(tied: bool) -> None:
    # residual_multiplier = 0 makes every layer the identity, leaving exactly
    # logits = head(RMSNorm(embed * embedding_multiplier)) / logits_scaling.
    model = _model(residual_multiplier=0.0, tie_word_embeddings=tied)
    ids = mx.array([[3, 1, 4, 1, 5]])
    emb = model.model.embed_tokens.weight
    head = emb if tied else model.lm_head.weight
    h = mx.fast.rms_norm(emb[ids] * 12.0, model.model.norm.weight, 1e-6)
    want = (h @ head.T) / 8.0
    assert mx.allclose(model(ids), want, atol=1e-5)


def test_quant_overrides_follow_mlx_lm_and_tying() -> None:
    tied = _model().quant_overrides
    untied = _model(tie_word_embeddings=False).quant_overrides
    assert len(tied) == 1 and (tied[0].bits, tied[0].group_size) == (8, 64)
    assert set(untied[0].suffixes) - set(tied[0].suffixes) == {"lm_head"}
    assert "block_sparse_moe.router.layer" in tied[0].suffixes


def test_quantizing_keeps_router_and_down_proj_at_8_bits() -> None:
    model = _model(tie_word_embeddings=False)
    config = quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    moe = model.layers[0].block_sparse_moe
    assert moe.router.layer.bits == 8 and moe.switch_mlp.down_proj.bits == 8
    assert moe.switch_mlp.gate_proj.bits == 4 and model.lm_head.bits == 8
    assert config["model.layers.1.block_sparse_moe.router.layer"]["bits"] == 8


def test_cast_predicate_casts_everything() -> None:
    model = _model()
    assert all(model.cast_predicate(k) for k in parameters(model))
