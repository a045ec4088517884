"""Checkpoint-name surgery shared by the model files' ``sanitize`` methods.

Knows how publisher (Hugging Face) checkpoints differ from the MLX layout in ways common to
several families: one tensor per expert that must be stacked into ``[E, out, in]``, tensors
to drop, tensors to rename. Knows nothing about any particular architecture.
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx

from moeserve.models.errors import CheckpointError

# A linear layer's tensors: float weight and bias, plus the quantized layout's scales/biases.
_PARTS = ("weight", "bias", "scales", "biases")
# The SwiGLU projections, under the names most publishers already give their experts.
_GLU = ("gate_proj", "up_proj", "down_proj")


def stack_experts(
    weights: dict[str, mx.array],
    prefixes: Iterable[str],
    num_experts: int,
    names: dict[str, str] | None = None,
    src: str = "experts",
    dst: str = "switch_mlp",
) -> dict[str, mx.array]:
    """Stack per-expert tensors ``{prefix}.{src}.{e}.{name}.*`` into ``{prefix}.{dst}.{new}.*``.

    A checkpoint already in the MLX layout has no per-expert tensors and passes through
    untouched; this also accepts quantized per-expert tensors (``scales``/``biases``).

    Args:
        weights: Checkpoint tensors, modified in place.
        prefixes: Module prefixes that own experts, e.g. ``model.layers.3.mlp``.
        num_experts: E.
        names: Per-expert module name -> stacked module name (e.g. ``{"w1": "gate_proj"}``);
            None when the experts' projections already are ``gate_proj/up_proj/down_proj``.
        src: Container name of the experts in the checkpoint.
        dst: Name of the stacked module in our model.

    Returns:
        ``weights``.

    Raises:
        CheckpointError: Some but not all experts of a layer are present.
    """
    names = names if names is not None else {name: name for name in _GLU}
    for prefix in prefixes:
        for old, new in names.items():
            for part in _PARTS:
                keys = [f"{prefix}.{src}.{e}.{old}.{part}" for e in range(num_experts)]
                present = [k for k in keys if k in weights]
                if not present:
                    continue
                if len(present) != num_experts:
                    missing = sorted(set(keys) - set(present))
                    raise CheckpointError(
                        f"checkpoint has {len(present)} of {num_experts} experts for "
                        f"{prefix}.{src}.*.{old}.{part}; missing e.g. {missing[0]}"
                    )
                weights[f"{prefix}.{dst}.{new}.{part}"] = mx.stack([weights.pop(k) for k in keys])
    return weights


def drop_prefixes(weights: dict[str, mx.array], prefixes: Iterable[str]) -> dict[str, mx.array]:
    """Remove every tensor whose name starts with one of ``prefixes``.

    Args:
        weights: Checkpoint tensors.
        prefixes: Name prefixes to drop (include the trailing dot).

    Returns:
        A new dictionary without those tensors.
    """
    prefixes = tuple(prefixes)
    return {k: v for k, v in weights.items() if not k.startswith(prefixes)}


def rename(weights: dict[str, mx.array], old: str, new: str) -> dict[str, mx.array]:
    """Rename every tensor whose name contains the substring ``old`` to use ``new``.

    Args:
        weights: Checkpoint tensors.
        old: Substring to replace (match whole name segments, e.g. ``".gate.weight"``).
        new: Replacement.

    Returns:
        A new dictionary.
    """
    return {k.replace(old, new): v for k, v in weights.items()}
