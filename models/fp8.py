"""Block-scaled FP8 checkpoints (DeepSeek-V3's format), decoded to float as they are read.

DeepSeek-V3, Kimi-K2, MiniMax-M2 and other publishers ship most linear weights as
``float8_e4m3fn`` codes with one float32 ``weight_scale_inv`` per block of
``weight_block_size`` (128 x 128) elements, and say so in ``config.json``:
``quantization_config`` = ``{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size":
[128, 128], ...}``. The real weight is ``code * scale_inv`` of its block (the name says
"inverse" because the quantizer divided by it). Edge blocks are partial: a ``[576, 7168]``
weight has ``[5, 56]`` scales. Without ``weight_block_size`` a weight has one scale.

``mx.load`` hands an ``F8_E4M3`` tensor over as its raw bytes (``uint8``); ``mx.from_fp8``
decodes them. ``dequantize_fp8`` turns every ``<name>.weight`` that has a
``<name>.weight_scale_inv`` beside it into a float weight and drops the scales (and the
activation scales, ``input_scale``, which only an FP8 matmul would use), before the model's
``sanitize``: every family then loads such checkpoints as float ones (MLX has no FP8 matmul;
``moeserve convert --quantize`` makes them small again).

This module knows the format only: which models use it, and their tensor names, it does not.

Shape legend: m, n = a weight's rows and columns; b0, b1 = the block's.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from moeserve.models.errors import CheckpointError

SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" + this: the block scales of that weight
ACTIVATION_SCALE = ".input_scale"  # per-tensor activation scales: only FP8 matmuls use them
_E4M3 = ("e4m3", "float8_e4m3fn", "float8_e4m3")
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def fp8_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The FP8 ``quantization_config`` of a config, or None for a checkpoint that is not FP8.

    Args:
        config: The parsed ``config.json``.

    Returns:
        The ``quantization_config`` entry when its ``quant_method`` is ``fp8``, else None.

    Raises:
        CheckpointError: An FP8 format other than e4m3 (e.g. e5m2).
    """
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    fmt = str(quant.get("fmt", "e4m3"))
    if fmt not in _E4M3:
        raise CheckpointError(f"FP8 format {fmt!r} is not supported (only e4m3 weights are)")
    return quant


def dequantize_block(
    codes: mx.array, scale_inv: mx.array, block: tuple[int, int], dtype: mx.Dtype
) -> mx.array:
    """Decode e4m3 codes and multiply each block by its scale.

    Args:
        codes: The raw bytes, ``uint8`` ``[m, n]``.
        scale_inv: float ``[ceil(m / b0), ceil(n / b1)]``.
        block: ``(b0, b1)``.
        dtype: The result's dtype (the product is formed in float32 first).

    Returns:
        ``[m, n]`` in ``dtype``.

    Raises:
        CheckpointError: The scales do not tile the weight in blocks of ``block``.
    """
    (m, n), (b0, b1) = codes.shape, block
    rows, cols = -(-m // b0), -(-n // b1)
    if tuple(scale_inv.shape) != (rows, cols):
        raise CheckpointError(
            f"an FP8 weight of shape {(m, n)} in blocks of {block} needs {(rows, cols)} "
            f"scales, got {tuple(scale_inv.shape)}"
        )
    w = mx.from_fp8(codes, dtype=mx.float32)
    # Pad to whole blocks so that each block is one [b0, b1] tile of a 4-D view, scale the
    # tiles by broadcasting (no [m, n] table of scales), then cut the padding off.
    w = mx.pad(w, ((0, rows * b0 - m), (0, cols * b1 - n))).reshape(rows, b0, cols, b1)
    w = w * scale_inv.astype(mx.float32)[:, None, :, None]
    return w.reshape(rows * b0, cols * b1)[:m, :n].astype(dtype)


def _blocks(
    quant: dict[str, Any], name: str, codes: mx.array, scale: mx.array
) -> tuple[tuple[int, int], mx.array]:
    """One weight's block shape and its scales as a grid.

    The declared blocks, or the whole weight as one block when the config declares none and
    there is a single scale.
    """
    block = quant.get("weight_block_size")
    if block:
        return (int(block[0]), int(block[1])), scale
    if scale.size != 1:
        raise CheckpointError(
            f"{name} has {tuple(scale.shape)} scales but quantization_config names no "
            "weight_block_size"
        )
    return (codes.shape[0], codes.shape[1]), scale.reshape(1, 1)


def dequantize_fp8(
    weights: dict[str, mx.array], config: dict[str, Any], dtype: mx.Dtype | None = None
) -> dict[str, mx.array]:
    """Decode every FP8 weight of a checkpoint (those with a ``weight_scale_inv``).

    Args:
        weights: Checkpoint tensors as ``mx.load`` reads them.
        config: The parsed ``config.json``; a checkpoint that is not FP8 passes untouched.
        dtype: The decoded weights' dtype; None: the config's ``torch_dtype`` (else bfloat16).

    Returns:
        A new dictionary without scales, every FP8 weight a float one (the same one when the
        config is not FP8).

    Raises:
        CheckpointError: A scale without its weight, a weight that is not FP8 codes, or
            scales that do not fit it.
    """
    quant = fp8_config(config)
    if quant is None:
        return weights
    dtype = dtype or _DTYPES.get(str(config.get("torch_dtype")), mx.bfloat16)
    out = {
        k: v
        for k, v in weights.items()
        if not k.endswith(SCALE_SUFFIX) and not k.endswith(ACTIVATION_SCALE)
    }
    for name, scale in weights.items():
        if not name.endswith(SCALE_SUFFIX):
            continue
        weight_name = name.removesuffix(SCALE_SUFFIX)
        codes = weights.get(weight_name)
        if codes is None:
            raise CheckpointError(f"{name} has no {weight_name} beside it")
        if codes.dtype != mx.uint8 or codes.ndim != 2:
            raise CheckpointError(
                f"{weight_name} has scales but is not FP8 codes (a 2-D float8_e4m3 tensor): "
                f"{codes.dtype} {tuple(codes.shape)}"
            )
        block, grid = _blocks(quant, name, codes, scale)
        out[weight_name] = dequantize_block(codes, grid, block, dtype)
    return out
