"""Weight quantization rules: which modules quantize, at what precision.

Knows MLX's group quantization (``nn.quantize``: affine, and the scale-only modes such as
mxfp4 that a checkpoint may carry) and mlx-lm's config format, in which
``config.json``'s ``quantization`` holds the defaults (``group_size``, ``bits``, ``mode``)
plus per-module overrides keyed by module path (a dict of settings, or ``false`` for a module
left in float). Knows nothing of any particular architecture: the model files pass their
rules in as ``QuantOverride`` values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

# A predicate in mlx-lm's convention: False = keep float, True = defaults, dict = overrides.
Predicate = Callable[[str, nn.Module], bool | dict[str, Any]]


@dataclass(frozen=True)
class QuantOverride:
    """Quantize modules whose path ends with one of ``suffixes`` at a different precision.

    Typical use: a router is small but every token's expert choice depends on it, so it is
    kept at 8 bits while the experts go to 4.
    """

    suffixes: tuple[str, ...]
    bits: int = 8
    group_size: int = 64


def _quantizable(module: nn.Module, group_size: int) -> bool:
    """Whether ``module`` can be quantized with ``group_size`` (input dim divisible by it)."""
    if not hasattr(module, "to_quantized") or "weight" not in module:
        return False
    return module.weight.shape[-1] % group_size == 0


def conversion_predicate(group_size: int, overrides: Sequence[QuantOverride] = ()) -> Predicate:
    """The predicate ``convert`` uses to quantize a float model.

    Args:
        group_size: Default group size.
        overrides: The model's precision exceptions.

    Returns:
        A predicate for ``nn.quantize``.
    """

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        for o in overrides:
            if path.endswith(o.suffixes):
                ok = _quantizable(module, o.group_size)
                return {"group_size": o.group_size, "bits": o.bits} if ok else False
        return _quantizable(module, group_size)

    return predicate


def quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int,
    mode: str = "affine",
    overrides: Sequence[QuantOverride] = (),
) -> dict[str, Any]:
    """Quantize ``model`` in place and return the ``quantization`` entry for its config.

    Args:
        model: A float model.
        bits: Default bits per weight.
        group_size: Default group size.
        mode: MLX quantization mode.
        overrides: The model's precision exceptions.

    Returns:
        ``{"group_size", "bits", "mode", <path>: {...} | False, ...}`` as mlx-lm writes it.
    """
    config: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": mode}
    decide = conversion_predicate(group_size, overrides)

    def recorder(path: str, module: nn.Module) -> bool | dict[str, Any]:
        decision = decide(path, module)
        if isinstance(decision, dict):
            config[path] = decision
        elif decision is False and hasattr(module, "to_quantized"):
            config[path] = False
        return decision

    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=recorder)
    return config


def checkpoint_predicate(quant: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Predicate:
    """The predicate that rebuilds a quantized checkpoint's module structure before loading.

    A module is quantized when the checkpoint carries ``<path>.scales`` for it. Its precision
    is read off the tensor shapes (packed weight ``[..., out, in * bits / 32]``, scales
    ``[..., out, in / group_size]``), which are authoritative; the config's per-module
    override or defaults are only the fallback. This keeps loading right when a model's
    ``sanitize`` renamed modules (e.g. DBRX's per-expert linears stacked into one), so the
    config's override keys no longer match our paths.

    Args:
        quant: The config's ``quantization`` entry.
        shapes: Shapes of the (sanitized) checkpoint tensors by name.

    Returns:
        A predicate for ``nn.quantize``.
    """

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        scales = shapes.get(f"{path}.scales")
        if not hasattr(module, "to_quantized") or scales is None or "weight" not in module:
            return False
        override = quant.get(path)
        settings = {"mode": quant.get("mode", "affine")}
        settings.update(override if isinstance(override, dict) else {})
        in_dims = module.weight.shape[-1]
        packed = shapes.get(f"{path}.weight")
        if packed and (32 * packed[-1]) % in_dims == 0 and in_dims % scales[-1] == 0:
            settings["bits"] = 32 * packed[-1] // in_dims
            settings["group_size"] = in_dims // scales[-1]
        settings["mode"] = _mode(settings, f"{path}.biases" in shapes)
        return settings

    return predicate


# The scale-only modes: each allows one (bits, group_size), with power-of-two or FP8 scales.
_SCALE_ONLY_MODES = {(4, 32): "mxfp4", (4, 16): "nvfp4", (8, 32): "mxfp8"}


def _mode(settings: dict[str, Any], has_biases: bool) -> str:
    """The quantization mode of a module, as its tensors show it.

    Only affine quantization stores per-group ``biases``; so a module with them is affine
    whatever the config's default says (mlx-lm, quantizing the rest of an MXFP4 gpt-oss,
    keeps ``"mode": "mxfp4"`` as the default and writes its 8-bit router override without a
    mode), and one without them is in the scale-only mode its bits and group size allow.
    """
    if has_biases:
        return "affine"
    if settings.get("mode", "affine") != "affine":
        return settings["mode"]
    return _SCALE_ONLY_MODES.get((settings.get("bits"), settings.get("group_size")), "affine")


def count_parameters(model: nn.Module) -> int:
    """Number of weights, counting quantized ones at their logical (unpacked) size.

    Args:
        model: Any model.

    Returns:
        The parameter count.
    """
    total = 0
    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    for _, module in leaves:
        bits = getattr(module, "bits", None)
        for name, value in tree_flatten(module.parameters()):
            if bits and name in ("scales", "biases"):
                continue  # quantization metadata, not weights
            total += value.size * 32 // bits if bits and name == "weight" else value.size
    return total
