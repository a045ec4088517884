"""Kimi-K2.5 specifics: the nested text configuration and the multimodal checkpoint's names.

The language model is DeepSeek-V3's (``test_deepseek_v3.py`` checks it); here: what is read
from ``text_config`` and the top level, the release's prefixes and vision tensors, the MLX
layout's prefixes, idempotence and the architecture names.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models import deepseek_v3
from moeserve.models.errors import ConfigError
from moeserve.models.registry import canonical_model_type
from tests.unit.models.helpers import KIMI_K25, assert_same, parameters, unstack_experts

TEXT = KIMI_K25.config["text_config"]


def test_text_config_is_read_as_deepseek_v3() -> None:
    args = KIMI_K25.args()
    assert isinstance(args, deepseek_v3.ModelArgs)
    assert args.model_type == "kimi_k25"  # the text's own "kimi_k2" does not win
    assert (args.num_hidden_layers, args.routed_scaling_factor) == (2, 2.827)
    # The top level's tie_word_embeddings wins over text_config's (transformers ties by it).
    tied = dict(KIMI_K25.config, tie_word_embeddings=True)
    assert KIMI_K25.module.ModelArgs.from_dict(tied).tie_word_embeddings
    untold = {k: v for k, v in KIMI_K25.config.items() if k != "tie_word_embeddings"}
    text_tied = dict(untold, text_config=dict(TEXT, tie_word_embeddings=True))
    assert KIMI_K25.module.ModelArgs.from_dict(text_tied).tie_word_embeddings


def test_a_config_without_text_config_is_named() -> None:
    with pytest.raises(ConfigError, match="text_config"):
        KIMI_K25.module.ModelArgs.from_dict({"model_type": "kimi_k25", "text_config": None})


def _publisher(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """The release's names (float experts per expert) plus vision and projector tensors."""
    out = {}
    for name, value in unstack_experts(params).items():
        prefix = "language_model." if name.startswith(("model.", "lm_head.")) else ""
        out[prefix + name] = value
    out["vision_tower.encoder.blocks.0.wqkv.weight"] = mx.zeros((6, 2))
    out["vision_tower.patch_embed.proj.weight"] = mx.zeros((2, 3, 2, 2))
    out["mm_projector.proj.0.weight"] = mx.zeros((4, 8))
    out["mm_projector.pre_norm.bias"] = mx.zeros((2,))
    return out


def test_sanitize_release_and_mlx_layouts() -> None:
    model = KIMI_K25.model()
    ours = parameters(model)
    publisher = _publisher(ours)
    assert "language_model.model.layers.1.mlp.experts.0.up_proj.weight" in publisher
    once = model.sanitize(dict(publisher))
    assert_same(once, ours)
    assert_same(model.sanitize(dict(once)), ours)
    # mlx-lm's conversions keep the language_model prefix on the stacked layout.
    mlx_layout = {"language_model." + k: v for k, v in ours.items()}
    assert_same(model.sanitize(mlx_layout), ours)


def test_architecture_names_resolve() -> None:
    assert canonical_model_type("KimiK25ForConditionalGeneration") == "kimi_k25"
    assert canonical_model_type("Kimi_K25ForConditionalGeneration") == "kimi_k25"
