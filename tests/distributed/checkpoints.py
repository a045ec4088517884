"""Tiny seeded checkpoints of each family, with a tokenizer, for the distributed tests.

The committed family fixtures (``tests/fixtures/models/<family>_a/hf/config.json``) have a
128-token vocabulary and no tokenizer; a server needs one. So each family's fixture config
is reused with the vocabulary of a small byte-level BPE tokenizer, the model is built with
random weights (activations kept O(1), as the demo model does) and saved in our parameter
names as several safetensors shards plus ``model.safetensors.index.json``: the index is what
lets a pipeline rank open only the shards holding its layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from moeserve.devtools.tokenizer_build import build_bpe_tokenizer
from moeserve.models.convert import save_weights
from moeserve.models.loader import build_model
from moeserve.server.text.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
ORIGINAL_FAMILIES = ["qwen2_moe", "glm4_moe", "bailing_moe", "granitemoe", "dbrx"]
NEWER_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "minimax_m2", "gpt_oss"]
# Hybrids of attention and recurrent (linear-attention) layers, MLA, and two checkpoints
# whose language model sits in text_config.
NEWEST_FAMILIES = ["qwen3_next", "qwen3_5_moe", "glm4_moe_lite", "kimi_k25"]
FAMILIES = ORIGINAL_FAMILIES + NEWER_FAMILIES + NEWEST_FAMILIES
# Variants: a family's fixture with config overrides. Two pipeline ranks of the first hold
# only attention layers (rank 0) and only linear-attention layers (rank 1).
VARIANTS = {
    "qwen3_next_attention_first": (
        "qwen3_next",
        {"layer_types": ["full_attention"] * 2 + ["linear_attention"] * 2},
    ),
}


def _init(name: str, shape: tuple[int, ...]) -> mx.array:
    if len(shape) == 1:  # norms near one, biases near zero
        return (1.0 if "norm" in name else 0.0) + 0.1 * mx.random.normal(shape)
    return mx.random.normal(shape) * (2.0 / shape[-1] ** 0.5)


def family_checkpoint(family: str, out: Path, seed: int = 3) -> Path:
    """Write a seeded random checkpoint of ``family`` with a tokenizer.

    Args:
        family: A fixture family (``tests/fixtures/models/<family>_a``) or a ``VARIANTS`` name.
        out: Directory to create.
        seed: Weight seed.

    Returns:
        ``out``.
    """
    family, overrides = VARIANTS.get(family, (family, {}))
    out.mkdir(parents=True, exist_ok=True)
    build_bpe_tokenizer(out, vocab_size=384)
    tokenizer = Tokenizer.from_dir(out)
    config = json.loads((FIXTURES / f"{family}_a" / "hf" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k != "quantization_config"} | overrides
    # A multimodal checkpoint (qwen3_5_moe, kimi_k25) keeps its language model's settings
    # in text_config, which is what the model is built from: both levels get the tokenizer's.
    for level in (config, config.get("text_config")):
        if level is not None:
            level["vocab_size"] = tokenizer.vocab_size
            level["eos_token_id"] = tokenizer.backend.token_to_id("<|im_end|>")
            level["max_position_embeddings"] = max(level.get("max_position_embeddings", 0), 1024)
    config["torch_dtype"] = "float32"
    mx.random.seed(seed)
    model, _ = build_model(config)
    weights = {name: _init(name, v.shape) for name, v in tree_flatten(model.parameters())}
    total = sum(v.nbytes for v in weights.values())
    save_weights(out, weights, shard_bytes=total // 3 + 1)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out
