"""Write a checkpoint in the MLX layout, optionally quantized.

Knows: loading any supported checkpoint (through ``models.loader``), each model's
quantization exceptions (``Model.quant_overrides``), and writing sharded safetensors with an
index and a ``config.json`` carrying mlx-lm's ``quantization`` entry, so that the result loads
in moeserve and in mlx-lm alike. Knows nothing of serving.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from moeserve.models.fp8 import fp8_config
from moeserve.models.loader import load
from moeserve.models.quantize import quantize_model

logger = logging.getLogger(__name__)

# Files copied alongside the weights: tokenizer, chat template, generation settings.
_AUX_GLOBS = (
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
    "*.jinja",
    "*.model",
    "*.tiktoken",
    "vocab*",
    "merges.txt",
    "added_tokens.json",
)
_SHARD_BYTES = 5 * 1024**3  # shard size cap, as mlx-lm and transformers use


def _shards(weights: dict[str, mx.array], limit: int) -> list[dict[str, mx.array]]:
    """Split tensors into groups of at most ``limit`` bytes (a lone larger tensor gets its own)."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, value in weights.items():
        if shards[-1] and size + value.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    return shards


def save_weights(dst: Path, weights: dict[str, mx.array], shard_bytes: int = _SHARD_BYTES) -> None:
    """Write tensors as safetensors shards plus ``model.safetensors.index.json``.

    Args:
        dst: Output directory (created).
        weights: Tensor name -> array.
        shard_bytes: Maximum bytes per shard.
    """
    dst.mkdir(parents=True, exist_ok=True)
    shards = _shards(weights, shard_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        )
        mx.save_safetensors(str(dst / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Convert ``src`` (any supported layout, or a Hub id) into an MLX-layout directory.

    Args:
        src: Source model directory or Hugging Face repo id.
        dst: Output directory; must not exist or be empty.
        quantize: Quantize weights (affine, per the model's precision exceptions).
        bits: Default bits per weight when quantizing.
        group_size: Default quantization group size.
        dtype: Cast floating weights first (e.g. ``"float16"``); None keeps the source's.

    Returns:
        The written ``config.json`` contents.

    Raises:
        FileExistsError: ``dst`` exists and is not empty.
    """
    out = Path(dst)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    loaded = load(src, dtype=dtype)
    config = dict(loaded.config)
    if fp8_config(config) is not None:  # the loader decoded the FP8 weights: they are float now
        del config["quantization_config"]
    if quantize and (config.get("quantization") or config.get("quantization_config")):
        raise ValueError(f"{src} is already quantized; convert from a float checkpoint")
    if quantize:
        overrides = getattr(loaded.model, "quant_overrides", ())
        quant = quantize_model(loaded.model, bits, group_size, overrides=overrides)
        config["quantization"] = config["quantization_config"] = quant
    save_weights(out, dict(tree_flatten(loaded.model.parameters())))
    for pattern in _AUX_GLOBS:
        for f in loaded.path.glob(pattern):
            if f.is_file():
                shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    logger.info("wrote %s (%s)", out, "quantized" if quantize else "float")
    return config
