"""What the per-family model tests share: each family's tiny config, building it, comparing.

``Family`` holds one architecture's tiny ``config.json`` (small enough to build in
milliseconds, with every feature the family's tests look at switched on) and builds its
``ModelArgs`` and ``Model``; ``FAMILIES`` lists them for the checks every family must pass
(``test_model_families.py``). ``parameters``, ``assert_same`` and ``unstack_experts`` are what the
sanitize tests of each family compare checkpoints with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from moeserve.models import (
    bailing_moe,
    dbrx,
    deepseek_v3,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    granitemoe,
    kimi_k25,
    minimax_m2,
    mixtral,
    qwen2_moe,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
)
from moeserve.models.base import BaseModelArgs, CausalLM


@dataclass(frozen=True)
class Family:
    """One architecture's tiny test model.

    Args:
        module: The model file (``ModelArgs``, ``Model``).
        config: The tiny ``config.json``.
        missing_key: A required key, for the check that ``from_dict`` names it.
        decode_over: Config overrides for the incremental-decoding check.
        decode_ids: The tokens of that check, ``[B, 7]``, all below the vocabulary size.
    """

    module: ModuleType
    config: dict[str, Any]
    missing_key: str
    decode_over: dict[str, Any] = field(default_factory=dict)
    decode_ids: tuple[tuple[int, ...], ...] = ((3, 17, 42, 8, 60, 11, 5),)

    @property
    def name(self) -> str:
        """The registry key (``model_type``)."""
        return self.config["model_type"]

    def args(self, **over: Any) -> BaseModelArgs:
        """``ModelArgs.from_dict`` of the tiny config with ``over`` merged in (top level)."""
        return self.module.ModelArgs.from_dict(self.config | over)

    def model(self, **over: Any) -> CausalLM:
        """The tiny model, seeded so that every build has the same weights, evaluated."""
        mx.random.seed(0)
        model = self.module.Model(self.args(**over))
        mx.eval(model.parameters())
        return model


QWEN2_MOE = Family(
    qwen2_moe,
    {
        "model_type": "qwen2_moe",
        "vocab_size": 96,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,
        "rms_norm_eps": 1e-6,
        "some_training_only_key": 0.1,  # unknown keys are ignored
    },
    missing_key="shared_expert_intermediate_size",
    decode_over={"num_hidden_layers": 3, "decoder_sparse_step": 2},
)

GLM4_MOE = Family(
    glm4_moe,
    {
        "model_type": "glm4_moe",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # wider than hidden_size / heads, as in GLM-4.5
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "use_qk_norm": True,
        "attention_bias": True,
        "num_nextn_predict_layers": 1,
    },
    missing_key="n_routed_experts",
    decode_over={"num_hidden_layers": 2, "first_k_dense_replace": 1},
    decode_ids=((3, 17, 42, 8, 60, 11, 5), (9, 9, 1, 0, 33, 70, 2)),
)

BAILING_MOE = Family(
    bailing_moe,
    {
        "model_type": "bailing_moe",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 64,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "first_k_dense_replace": 1,
        "num_shared_experts": 1,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "use_qk_norm": True,
        "use_qkv_bias": True,
        "norm_head": True,
        "partial_rotary_factor": 0.5,
    },
    missing_key="moe_intermediate_size",
    decode_over={"score_function": "softmax", "n_group": 1, "moe_router_enable_expert_bias": False},
)

GRANITEMOE = Family(
    granitemoe,
    {
        "model_type": "granitemoe",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 48,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "embedding_multiplier": 12.0,
        "attention_multiplier": 0.015,
        "residual_multiplier": 0.22,
        "logits_scaling": 8.0,
        "tie_word_embeddings": True,
    },
    missing_key="num_local_experts",
    decode_ids=((3, 17, 42, 8, 40, 11, 5), (9, 9, 1, 0, 33, 47, 2)),
)

DBRX = Family(
    dbrx,
    {
        "model_type": "dbrx",
        "vocab_size": 48,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "max_seq_len": 128,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 500000.0},
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    },
    missing_key="n_heads",
    decode_ids=((3, 17, 42, 8, 40, 11, 5), (9, 9, 1, 0, 33, 47, 2)),
)

QWEN3_MOE = Family(
    qwen3_moe,
    {
        "model_type": "qwen3_moe",
        "vocab_size": 96,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # wider than hidden_size / heads, as in Qwen3-30B-A3B
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "norm_topk_prob": True,
        "attention_bias": True,
    },
    missing_key="moe_intermediate_size",
    decode_over={"num_hidden_layers": 3, "decoder_sparse_step": 2, "mlp_only_layers": [2]},
)

MIXTRAL = Family(
    mixtral,
    {
        "model_type": "mixtral",
        "vocab_size": 96,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 3,  # the decoding check crosses the window
    },
    missing_key="num_local_experts",
    decode_ids=((3, 17, 42, 8, 60, 11, 5), (9, 9, 1, 0, 33, 70, 2)),
)

MINIMAX_M2 = Family(
    minimax_m2,
    {
        "model_type": "minimax_m2",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # H*D = 128 over a 64-wide residual, as in MiniMax-M2 (6144 / 3072)
        "rotary_dim": 16,  # half of each head rotates
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "use_routing_bias": True,
        "attn_type_list": [1, 1],
    },
    missing_key="num_local_experts",
    decode_ids=((3, 17, 42, 8, 60, 11, 5), (9, 9, 1, 0, 33, 70, 2)),
)

GPT_OSS = Family(
    gpt_oss,
    {
        "model_type": "gpt_oss",
        "vocab_size": 96,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 3,  # the decoding check crosses the window
        "layer_types": ["sliding_attention", "full_attention"],
        "swiglu_limit": 0.5,  # small enough that the clamps bite on random weights
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
        },
    },
    missing_key="num_local_experts",
    decode_ids=((3, 17, 42, 8, 60, 11, 5), (9, 9, 1, 0, 33, 70, 2)),
)

QWEN3_NEXT = Family(
    qwen3_next,
    {
        "model_type": "qwen3_next",
        "vocab_size": 96,
        "hidden_size": 64,
        "num_hidden_layers": 4,  # linear, full, linear, full
        "full_attention_interval": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "mlp_only_layers": [0],
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,  # two value heads per key head
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 8,
    },
    missing_key="linear_num_value_heads",
    decode_ids=((3, 17, 42, 8, 60, 11, 5), (9, 9, 1, 0, 33, 70, 2)),
)

# The flat (text-only) spelling, which ``Family.args`` can override; 3 layers: linear, full,
# linear. The nested ``text_config`` spelling is tested in test_qwen3_5_moe.py.
QWEN3_5_MOE = Family(
    qwen3_5_moe,
    QWEN3_NEXT.config | {"model_type": "qwen3_5_moe", "num_hidden_layers": 3},
    missing_key="linear_key_head_dim",
    decode_ids=((3, 17, 42, 8, 60, 11, 5), (9, 9, 1, 0, 33, 70, 2)),
)

DEEPSEEK_V3 = Family(
    deepseek_v3,
    {
        "model_type": "deepseek_v3",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": 24,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,  # narrower than the keys' 16 + 8, as in DeepSeek-V3
        "attention_bias": True,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
        "max_position_embeddings": 64,
    },
    missing_key="kv_lora_rank",
    decode_over={"q_lora_rank": None, "rope_interleave": False},
    decode_ids=((3, 17, 42, 8, 60, 11, 5), (9, 9, 1, 0, 33, 70, 2)),
)

GLM4_MOE_LITE = Family(
    glm4_moe_lite,
    {
        "model_type": "glm4_moe_lite",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "kv_lora_rank": 32,
        "q_lora_rank": 24,
        "qk_nope_head_dim": 24,
        "qk_rope_head_dim": 8,
        "v_head_dim": 32,  # as wide as the keys (24 + 8), as in GLM-4.7-Flash
        "mlp_layer_types": ["dense", "sparse", "dense"],
    },
    missing_key="qk_rope_head_dim",
)

KIMI_K25 = Family(
    kimi_k25,
    {
        "model_type": "kimi_k25",
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "kimi_k2",
            "vocab_size": 96,
            "hidden_size": 64,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 32,
            "q_lora_rank": 24,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "routed_scaling_factor": 2.827,
        },
        "vision_config": {"hidden_size": 32},
    },
    missing_key="text_config",
)

FAMILIES = (
    QWEN2_MOE,
    GLM4_MOE,
    BAILING_MOE,
    GRANITEMOE,
    DBRX,
    QWEN3_MOE,
    MIXTRAL,
    MINIMAX_M2,
    GPT_OSS,
    QWEN3_NEXT,
    QWEN3_5_MOE,
    DEEPSEEK_V3,
    GLM4_MOE_LITE,
    KIMI_K25,
)


def parameters(model: CausalLM) -> dict[str, mx.array]:
    """A model's parameters by their checkpoint names."""
    return dict(tree_flatten(model.parameters()))


def assert_same(got: dict[str, mx.array], want: dict[str, mx.array], atol: float = 0.0) -> None:
    """The same tensor names, dtypes and shapes; equal values (within ``atol`` when given)."""
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        if atol == 0.0:
            assert mx.array_equal(got[name], value).item(), name
        else:
            assert mx.allclose(got[name], value, rtol=0, atol=atol).item(), name


def unstack_experts(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Split every stacked ``switch_mlp`` tensor into the publisher's one-tensor-per-expert."""
    out = {}
    for name, value in params.items():
        if ".switch_mlp." not in name:
            out[name] = value
            continue
        for e in range(value.shape[0]):
            out[name.replace(".switch_mlp.", f".experts.{e}.")] = value[e]
    return out
