"""Publisher MXFP4 weights (OCP Microscaling FP4) read straight into MLX's ``mxfp4`` mode.

MXFP4 ("OCP Microscaling Formats (MX) Specification v1.0", 2023) stores a matrix in groups of
32 consecutive values along the input dimension: each value is a 4-bit float (E2M1: sign, two
exponent bits, one mantissa bit; ``E2M1_VALUES`` below, code 8 being -0) and each group
shares one 8-bit power-of-two scale (E8M0, bias 127), so ``w = E2M1_VALUES[code] *
2 ** (scale - 127)``. OpenAI ships gpt-oss's expert weights this way, and its
``config.json`` says ``"quantization_config": {"quant_method": "mxfp4", ...}``. Each
quantized parameter ``X`` of shape ``[..., out, in]`` is stored as two ``uint8`` tensors:

* ``X_blocks`` ``[..., out, in / 32, 16]``: 16 bytes per group, two codes per byte, the
  *low* nibble holding the even element and the high nibble the odd one;
* ``X_scales`` ``[..., out, in / 32]``: the biased exponents.

(transformers' ``integrations/mxfp4.py`` decodes exactly this in
``convert_moe_packed_tensors``.) MLX's own ``mxfp4`` quantization mode (``mx.quantize(...,
mode="mxfp4")``, group 32, 4 bits) uses the same codes, the same E8M0 scales and the same
nibble order, packed eight codes to a little-endian ``uint32``: so the publisher's bytes,
reinterpreted as ``uint32`` words, *are* MLX's packed weight, and its scales are MLX's
scales. Loading keeps the experts at 4 bits, bit for bit as published, and runs them through
``gather_qmm`` with ``mode="mxfp4"``.

Knows: that layout and the quantization entry the loader gives such a checkpoint. Does not
know which tensors of a checkpoint are MXFP4 (the model's ``sanitize`` renames them) and
does not dequantize (``mx.dequantize(..., mode="mxfp4")`` does, where a float is wanted).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from moeserve.models.errors import CheckpointError

GROUP_SIZE = 32  # values sharing one scale
SCALE_BIAS = 127  # E8M0: the stored byte minus this is the power of two
# The 16 E2M1 codes' values, code 0..15: sign bit 3, exponent bits 2-1, mantissa bit 0.
E2M1_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
# The loader's quantization entry for a checkpoint whose quantization_config says "mxfp4".
QUANTIZATION: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": 4, "mode": "mxfp4"}
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def is_mxfp4(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` declares publisher MXFP4 weights.

    Args:
        config: The parsed ``config.json``.

    Returns:
        True when ``quantization_config.quant_method`` is ``"mxfp4"``.
    """
    other = config.get("quantization_config")
    return isinstance(other, dict) and other.get("quant_method") == "mxfp4"


def blocks_to_mlx(blocks: mx.array, name: str = "blocks") -> mx.array:
    """The publisher's packed bytes as MLX's packed ``mxfp4`` weight (no copy of values).

    Args:
        blocks: ``uint8`` ``[..., out, in / 32, 16]``.
        name: The tensor's name, for the error.

    Returns:
        ``uint32`` ``[..., out, in / 8]``: eight codes a word, element 0 in the low nibble.

    Raises:
        CheckpointError: Not ``uint8`` groups of 16 bytes.
    """
    if blocks.dtype != mx.uint8 or blocks.ndim < 2 or blocks.shape[-1] != GROUP_SIZE // 2:
        raise CheckpointError(
            f"{name}: MXFP4 blocks must be uint8 [..., groups, 16], got {blocks.dtype} "
            f"{tuple(blocks.shape)}"
        )
    # Byte k of a little-endian word is bits 8k..8k+7, so byte order = element order; MLX
    # runs on little-endian machines only (Apple silicon, x86-64, arm64 Linux).
    return blocks.view(mx.uint32).flatten(-2, -1)
