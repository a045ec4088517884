"""Build a model from a checkpoint: read its config and weights, then build and fill the model.

Knows: ``config.json`` / ``generation_config.json``, both checkpoint layouts (each model's
``sanitize`` maps the publisher's names to ours), mlx-lm's quantization config with per-module
overrides, publishers' block-FP8 weights (decoded to float by ``models.fp8`` before
``sanitize``), dtype casting, checking tensors against the model's parameters, and reading
them from disk with progress. Finding the directory (local or a Hugging Face repo id, honouring
``HF_HUB_OFFLINE``) and reading its JSON and single-file or sharded safetensors is
``models.checkpoint``'s; its public names are re-exported here, where their users import them
from. Every failure raises a ``models.errors`` exception whose message names the file, key or
tensor. Knows nothing about tokenizers, HTTP or serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# The public names are re-exported: the server, the CLI and the KV-cache files import them from
# this module.
from moeserve.models.checkpoint import HUB_PATTERNS as HUB_PATTERNS
from moeserve.models.checkpoint import check_safetensors as check_safetensors
from moeserve.models.checkpoint import read_json as read_json
from moeserve.models.checkpoint import read_weights as read_weights
from moeserve.models.checkpoint import resolve_model_path as resolve_model_path
from moeserve.models.checkpoint import weight_files as weight_files
from moeserve.models.errors import CheckpointError, ConfigError
from moeserve.models.fp8 import dequantize_fp8, fp8_config
from moeserve.models.mxfp4 import QUANTIZATION as MXFP4_QUANTIZATION
from moeserve.models.mxfp4 import is_mxfp4
from moeserve.models.quantize import checkpoint_predicate
from moeserve.models.registry import canonical_model_type, get_model_module
from moeserve.models.shard import Shard

logger = logging.getLogger(__name__)

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_MAX_LISTED = 5  # names shown in an error before "and N more"
# With a progress callback, parameters are evaluated (read from disk) in batches of this size.
_EVAL_BATCH_BYTES = 256 * 2**20

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class LoadedModel:
    """A built model with everything the server needs to know about where it came from."""

    model: nn.Module
    config: dict[str, Any]  # config.json as published
    path: Path  # the resolved local directory (tokenizer files live here too)
    model_type: str  # registered model type
    generation_config: dict[str, Any] = field(default_factory=dict)


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    """Turn a dtype name into an MLX dtype.

    Args:
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"``, an ``mx.Dtype`` or None.

    Returns:
        The dtype, or None to keep the checkpoint's.

    Raises:
        ValueError: An unknown name.
    """
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _listing(names: set[str]) -> str:
    shown = sorted(names)[:_MAX_LISTED]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: Path) -> None:
    """Compare checkpoint tensors with the model's parameters by name and shape.

    Args:
        model: The built (and, if needed, quantized) model.
        weights: Sanitized checkpoint tensors.
        source: The directory, for the message.

    Raises:
        CheckpointError: Missing, unexpected or mis-shaped tensors.
    """
    expected = dict(tree_flatten(model.parameters()))
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{source}: weights missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected weights the model does not use: {_listing(unexpected)}"
        )
    for name, param in expected.items():
        if weights[name].shape != param.shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(weights[name].shape)} but the config "
                f"implies {tuple(param.shape)}"
            )


def _quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The mlx-lm quantization entry of a config, or None for a float checkpoint."""
    quant = config.get("quantization")
    other = config.get("quantization_config")
    if quant is None and isinstance(other, dict):
        if is_mxfp4(config):  # gpt-oss's publisher blocks are MLX's own mxfp4 (models/mxfp4.py)
            return dict(MXFP4_QUANTIZATION)
        if fp8_config(config) is not None:  # decoded to float at load (models/fp8.py)
            return None
        if "quant_method" in other:  # GPTQ, AWQ, FP8 ...: a torch-side format
            raise CheckpointError(
                f"quantization method {other['quant_method']!r} is not supported; convert the "
                "float checkpoint with `moeserve convert --quantize` instead"
            )
        quant = other
    return quant


def _cast(model: nn.Module, weights: dict[str, mx.array], dtype: mx.Dtype) -> None:
    """Cast floating-point tensors to ``dtype`` in place, except those the model keeps float32."""
    keep = getattr(model, "cast_predicate", lambda _name: True)
    for name, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating) and keep(name):
            weights[name] = value.astype(dtype)


def build_model_type(config: dict[str, Any]) -> str:
    """The registered model type a config asks for.

    Args:
        config: The parsed ``config.json``.

    Returns:
        The canonical model type.

    Raises:
        ConfigError: No model type at all.
        UnsupportedModelError: A type the registry does not know.
    """
    model_type = config.get("model_type") or next(iter(config.get("architectures") or []), None)
    if not model_type:
        raise ConfigError("config.json has no model_type (nor architectures)")
    return canonical_model_type(model_type)


def build_model(config: dict[str, Any]) -> tuple[nn.Module, str]:
    """Instantiate the registered model for a config (random weights).

    Args:
        config: The parsed ``config.json``.

    Returns:
        The model and its registered model type.
    """
    name = build_model_type(config)
    module = get_model_module(name)
    return module.Model(module.ModelArgs.from_dict({**config, "model_type": name})), name


def load(
    path_or_repo: str | Path,
    dtype: str | mx.Dtype | None = None,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> LoadedModel:
    """Resolve, build and load a model.

    On a CPU backend float32 is the fast choice: MLX's CPU half-precision and quantized
    kernels are much slower than its float32 matmul.

    Args:
        path_or_repo: Local directory or Hugging Face repo id.
        dtype: Cast floating weights to this dtype; None keeps the checkpoint's.
        progress: Called with (bytes done, bytes total) while the weights are read.
        shard: The part of the model one rank of a distributed server holds
            (``models.shard``); None loads the whole model.

    Returns:
        The loaded model and its metadata.
    """
    path = resolve_model_path(path_or_repo)
    config = read_json(path / "config.json")
    model, model_type = build_model(config)
    target = parse_dtype(dtype)
    keep = None
    if shard is not None:
        shard.prepare(model)
        keep = shard.keep_tensor
    # A block-FP8 publisher checkpoint becomes float here, so sanitize sees float tensors.
    weights = model.sanitize(dequantize_fp8(read_weights(path, keep), config, target))
    if shard is not None:
        weights = shard.rename(model, weights)
    quant = _quantization(config)
    if quant is not None:
        nn.quantize(
            model,
            group_size=quant.get("group_size", 64),
            bits=quant.get("bits", 4),
            mode=quant.get("mode", "affine"),
            class_predicate=checkpoint_predicate(
                quant, {k: tuple(v.shape) for k, v in weights.items()}
            ),
        )
    if target is not None:
        _cast(model, weights, target)
    check_weights(model, weights, path)
    model.load_weights(list(weights.items()), strict=True)
    _materialize(model, progress)
    generation_config = read_json(path / "generation_config.json", required=False)
    return LoadedModel(model, config, path, model_type, generation_config)


def _materialize(model: nn.Module, progress: Progress | None) -> None:
    """Evaluate the parameters, reporting progress in bytes.

    ``mx.load`` is lazy: the files are read here, when the parameters (after sanitize, cast
    and quantization) are evaluated, so this is where a progress bar has something to show.
    Each batch reads just the tensors its parameters depend on, as one ``mx.eval`` of
    everything would, only in several steps.
    """
    if progress is None:
        mx.eval(model.parameters())
        return
    params = [v for _, v in tree_flatten(model.parameters())]
    total = sum(v.nbytes for v in params)
    done, batch, batch_bytes = 0, [], 0
    progress(0, total)
    for i, value in enumerate(params):
        batch.append(value)
        batch_bytes += value.nbytes
        if batch_bytes >= _EVAL_BATCH_BYTES or i == len(params) - 1:
            mx.eval(batch)
            done += batch_bytes
            progress(done, total)
            batch, batch_bytes = [], 0


def load_model(
    path_or_repo: str | Path, dtype: str | mx.Dtype | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model from a local directory or a Hugging Face repo id.

    Args:
        path_or_repo: Local directory or repo id (MLX or publisher layout, float or quantized).
        dtype: Optional dtype for floating weights (``"float32"`` is fastest on CPU).

    Returns:
        ``(model, config)`` where ``config`` is the parsed ``config.json``.
    """
    loaded = load(path_or_repo, dtype)
    return loaded.model, loaded.config
