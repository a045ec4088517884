"""Qwen2-MoE specifics that the golden-logit parity tests do not pin down.

Layer layout (decoder_sparse_step / mlp_only_layers), config validation, tied embeddings,
sanitize in both layouts (float and quantized) and its idempotence, incremental decoding.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from models.errors import CheckpointError, ConfigError
from models.layers.mlp import GatedMLP
from models.quantize import quantize_model
from models.qwen2_moe import Model, ModelArgs, SparseMoeBlock

E = 4  # routed experts in the tiny config
EMBED = "model.embed_tokens.weight"


def _config(**over: object) -> dict:
    cfg = {
        "model_type": "qwen2_moe",
        "vocab_size": 96,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": E,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,
        "rms_norm_eps": 1e-6,
        "some_training_only_key": 0.1,  # unknown keys are ignored
    }
    return cfg | over


def _model(**over: object) -> Model:
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(_config(**over)))
    mx.eval(model.parameters())
    return model


def _params(model: Model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def _to_publisher(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Split every stacked ``switch_mlp`` tensor into the publisher's one-tensor-per-expert."""
    out = {}
    for name, value in params.items():
        if ".switch_mlp." not in name:
            out[name] = value
            continue
        for e in range(value.shape[0]):
            out[name.replace(".switch_mlp.", f".experts.{e}.")] = value[e]
    return out


def _assert_same(got: dict[str, mx.array], want: dict[str, mx.array]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert mx.array_equal(got[name], value).item(), name


def test_from_dict_names_a_missing_key() -> None:
    cfg = _config()
    del cfg["shared_expert_intermediate_size"]
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size"):
        ModelArgs.from_dict(cfg)


@pytest.mark.parametrize(
    "over",
    [{"use_sliding_window": True}, {"decoder_sparse_step": 0}, {"num_experts_per_tok": E + 1}],
)
def test_from_dict_rejects_unsupported_settings(over: dict) -> None:
    with pytest.raises(ConfigError):
        ModelArgs.from_dict(_config(**over))


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
    ours = _params(model)
    publisher = _to_publisher(ours)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in publisher
    once = model.sanitize(dict(publisher))
    _assert_same(once, ours)
    _assert_same(model.sanitize(dict(once)), ours)  # the MLX layout passes through


def test_sanitize_stacks_quantized_per_expert_tensors() -> None:
    model = _model()
    quantize_model(model, bits=4, group_size=64, overrides=model.quant_overrides)
    ours = _params(model)
    assert "model.layers.0.mlp.switch_mlp.up_proj.scales" in ours
    _assert_same(model.sanitize(_to_publisher(ours)), ours)


def test_sanitize_rejects_a_layer_with_missing_experts() -> None:
    model = _model()
    publisher = _to_publisher(_params(model))
    del publisher["model.layers.0.mlp.experts.2.gate_proj.weight"]
    with pytest.raises(CheckpointError, match="experts"):
        model.sanitize(publisher)


def test_tied_embeddings_reuse_the_embedding_as_head() -> None:
    tied, untied = _model(tie_word_embeddings=True), _model()
    assert "lm_head.weight" not in _params(tied)
    weights = _params(tied)
    # A checkpoint that also carries a head copy loads: sanitize drops it.
    cleaned = tied.sanitize({**weights, "lm_head.weight": weights[EMBED]})
    _assert_same(cleaned, weights)
    untied.load_weights([*weights.items(), ("lm_head.weight", weights[EMBED])])
    ids = mx.array([[1, 5, 9, 2]])
    assert mx.allclose(tied(ids), untied(ids), atol=1e-5).item()


def test_quantization_and_cast_rules() -> None:
    model = _model()
    assert model.quant_overrides == ()  # mlx-lm's practice: uniform precision
    assert all(model.cast_predicate(name) for name in _params(model))


def test_incremental_decoding_matches_the_full_forward() -> None:
    model = _model(num_hidden_layers=3, decoder_sparse_step=2)
    ids = mx.array([[3, 17, 42, 8, 60, 11, 5]])
    full = model(ids)
    cache = model.make_cache()
    steps = [model(ids[:, :4], cache)] + [model(ids[:, t : t + 1], cache) for t in range(4, 7)]
    assert mx.allclose(mx.concatenate(steps, axis=1), full, atol=1e-4).item()
    # Without the cache the last token alone sees no context: the check above is not vacuous.
    assert not mx.allclose(model(ids[:, 6:7])[:, 0], full[:, 6], atol=1e-4).item()
