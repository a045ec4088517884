"""Tiny seeded Qwen2-MoE checkpoints built offline: the default demo model, tests and benches.

``build_checkpoint(out_dir, spec)`` writes a complete model directory in the MLX layout
(``config.json``, safetensors, ``generation_config.json``) plus a byte-level BPE tokenizer
with a ChatML template, from nothing but a seed: no download, a few seconds, and the same
bytes every time for the same spec. The weights are random, so the text it generates is
meaningless; it exists so that ``moeserve`` runs out of the box and so tests exercise the
real loading and serving path. It knows nothing about HTTP.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from moeserve.devtools.tokenizer_build import build_bpe_tokenizer
from moeserve.models.convert import save_weights
from moeserve.models.loader import build_model
from moeserve.server.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEMO_MODEL_ID = "moeserve-demo"
_NOT_CONFIG = ("seed", "dtype", "init_scale", "tokenizer_corpus")


@dataclass(frozen=True)
class CheckpointSpec:
    """Shape of a generated Qwen2-MoE checkpoint."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 128
    vocab_size: int = 512  # tokenizer training target; the model's vocab is what it reached
    max_position_embeddings: int = 4096
    seed: int = 0
    dtype: str = "float32"
    init_scale: float = 1.0  # matrices ~ N(0, (init_scale / sqrt(fan_in))^2)
    tokenizer_corpus: tuple[str, ...] | None = None  # training text; None = the built-in one

    def config(self, vocab_size: int) -> dict[str, Any]:
        """The ``config.json`` for this spec.

        Args:
            vocab_size: The trained tokenizer's vocabulary size.

        Returns:
            A Qwen2-MoE config dictionary.
        """
        c = {k: v for k, v in asdict(self).items() if k not in _NOT_CONFIG}
        c.update(
            model_type="qwen2_moe",
            architectures=["Qwen2MoeForCausalLM"],
            vocab_size=vocab_size,
            intermediate_size=self.moe_intermediate_size * 2,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            norm_topk_prob=True,
            torch_dtype=self.dtype,
        )
        return c


def build_checkpoint(out_dir: str | Path, spec: CheckpointSpec | None = None) -> Path:
    """Write a seeded random checkpoint and its tokenizer to ``out_dir``.

    Args:
        out_dir: Directory to create (overwritten files if it exists).
        spec: Shapes and seed; defaults to the demo model.

    Returns:
        ``out_dir``.
    """
    spec = spec or CheckpointSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_bpe_tokenizer(out, vocab_size=spec.vocab_size, corpus=spec.tokenizer_corpus)
    tokenizer = Tokenizer.from_dir(out)
    config = spec.config(tokenizer.vocab_size)
    im_end = tokenizer.backend.token_to_id("<|im_end|>")
    eot = tokenizer.backend.token_to_id("<|endoftext|>")
    config["eos_token_id"] = im_end
    mx.random.seed(spec.seed)
    model, _ = build_model(config)
    dtype = getattr(mx, spec.dtype)
    weights = {
        name: _init(name, v.shape, spec.init_scale).astype(dtype)
        for name, v in tree_flatten(model.parameters())
    }
    save_weights(out, weights)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = {"eos_token_id": [im_end, eot], "bos_token_id": eot}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def _init(name: str, shape: tuple[int, ...], scale: float) -> mx.array:
    """Random weights that keep activations O(1): scaled matrices, norm gains near one."""
    if len(shape) == 1:
        return (1.0 if "norm" in name else 0.0) + 0.1 * mx.random.normal(shape)
    return mx.random.normal(shape) * (scale / shape[-1] ** 0.5)


def demo_model_dir() -> Path:
    """Where the demo model lives, building it on first use.

    The directory is ``$MOESERVE_CACHE_DIR/moeserve-demo`` (default
    ``~/.cache/moeserve``); a marker file records a finished build, so an interrupted
    build is redone rather than half-loaded.

    Returns:
        The model directory.
    """
    root = Path(os.environ.get("MOESERVE_CACHE_DIR", Path.home() / ".cache" / "moeserve"))
    out = root / DEMO_MODEL_ID
    marker = out / ".complete"
    if not marker.exists():
        logger.info("building the demo model in %s (first start only)", out)
        build_checkpoint(out)
        marker.write_text("ok\n")
    return out
