"""GLM-4.7-Flash specifics: its defaults and which layers are dense.

The model is DeepSeek-V3's (``test_deepseek_v3.py``, ``test_mla.py``); here: transformers'
``Glm4MoeLiteConfig`` defaults, ``mlp_layer_types`` against ``first_k_dense_replace``, the
latent norms' epsilon, and sanitize of the release layout with its MTP layer.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models.errors import ConfigError
from moeserve.models.glm4_moe import MoE
from moeserve.models.layers.mla import LATENT_NORM_EPS
from moeserve.models.registry import canonical_model_type
from tests.unit.models.helpers import GLM4_MOE_LITE, assert_same, parameters, unstack_experts

_model = GLM4_MOE_LITE.model


def _sparse(model) -> list[bool]:
    return [isinstance(layer.mlp, MoE) for layer in model.layers]


def test_defaults_are_glm_47_flashs() -> None:
    args = GLM4_MOE_LITE.args()
    assert (args.routed_scaling_factor, args.rms_norm_eps, args.n_group) == (1.8, 1e-5, 1)
    attn = _model().layers[0].self_attn
    # transformers' latent norms keep their own epsilon, not rms_norm_eps.
    assert attn.kv_a_layernorm.eps == attn.q_a_layernorm.eps == LATENT_NORM_EPS == 1e-6
    assert _model().layers[0].input_layernorm.eps == 1e-5


def test_mlp_layer_types_win_over_first_k_dense_replace() -> None:
    assert _sparse(_model()) == [False, True, False]  # the helper's list
    assert _sparse(_model(first_k_dense_replace=2, mlp_layer_types=None)) == [False, False, True]
    assert _sparse(_model(mlp_layer_types=None)) == [False, True, True]  # default k = 1


@pytest.mark.parametrize("kinds", [["dense", "sparse"], ["dense", "moe", "dense"]])
def test_bad_mlp_layer_types_are_refused(kinds: list[str]) -> None:
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        GLM4_MOE_LITE.args(mlp_layer_types=kinds)


def test_sanitize_drops_the_mtp_layer_and_stacks_experts() -> None:
    model = _model()
    ours = parameters(model)
    publisher = unstack_experts(ours)
    publisher["model.layers.3.eh_proj.weight"] = mx.zeros((4, 4))
    publisher["model.layers.3.mlp.experts.0.up_proj.weight"] = mx.zeros((4, 4))
    once = model.sanitize(publisher)
    assert_same(once, ours)
    assert_same(model.sanitize(dict(once)), ours)


def test_architecture_name_resolves() -> None:
    assert canonical_model_type("Glm4MoeLiteForCausalLM") == "glm4_moe_lite"
