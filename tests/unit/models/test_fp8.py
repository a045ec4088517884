"""Block-scaled FP8 decoding (``models.fp8``) against torch's own float8_e4m3fn.

The codes are written by torch (``Tensor.to(torch.float8_e4m3fn)``) and decoded by torch
for the expected values, so MLX's decoding and our block arithmetic are checked against an
implementation that is not ours. The end-to-end load of an FP8 MiniMax-M2 checkpoint is in
``test_minimax_m2.py``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models.errors import CheckpointError
from moeserve.models.fp8 import dequantize_block, dequantize_fp8, fp8_config

torch = pytest.importorskip("torch")

FP8 = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "weight_block_size": [16, 24]}


def encode(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block FP8 as publishers write it: (uint8 codes, float32 scale_inv, torch's decoding)."""
    t = torch.from_numpy(w.astype(np.float32))
    rows, cols = t.shape
    bo, bi = block
    scale = torch.empty(math.ceil(rows / bo), math.ceil(cols / bi))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = t[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi]
            scale[i, j] = tile.abs().max() / 448.0  # e4m3's largest finite value
    full = scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:rows, :cols]
    codes = (t / full).to(torch.float8_e4m3fn)
    decoded = codes.to(torch.float32) * full
    return codes.view(torch.uint8).numpy(), scale.numpy(), decoded.numpy()


def test_ragged_blocks_decode_as_torch_does() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 50)).astype(np.float32)  # neither side a multiple of the block
    codes, scale, want = encode(w, (16, 24))
    got = dequantize_block(mx.array(codes), mx.array(scale), (16, 24), mx.float32)
    assert np.array_equal(np.array(got), want)
    # Not vacuous: FP8 is coarse, so the decoded matrix is not the original.
    assert np.abs(want - w).max() > 1e-3


def test_checkpoint_weights_are_decoded_and_scales_dropped() -> None:
    rng = np.random.default_rng(1)
    codes, scale, want = encode(rng.standard_normal((32, 48)), (16, 24))
    router = mx.array(rng.standard_normal((4, 48)).astype(np.float32))
    weights = {
        "a.weight": mx.array(codes),
        "a.weight_scale_inv": mx.array(scale),
        "a.input_scale": mx.array(1.0),  # activation scale: only FP8 matmuls use it
        "gate.weight": router,  # a module left in float passes through
    }
    config = {"quantization_config": FP8, "torch_dtype": "bfloat16"}
    out = dequantize_fp8(weights, config)
    assert sorted(out) == ["a.weight", "gate.weight"]
    assert out["a.weight"].dtype == mx.bfloat16  # the config's dtype when none is asked for
    assert out["gate.weight"] is router
    again = dequantize_fp8(
        {"a.weight": mx.array(codes), "a.weight_scale_inv": mx.array(scale)}, config, mx.float32
    )
    assert np.array_equal(np.array(again["a.weight"]), want)
    decoded = again["a.weight"]
    assert dequantize_fp8(again, config)["a.weight"] is decoded  # nothing left to decode


def test_not_fp8_configs_are_left_alone() -> None:
    weights = {"a.weight": mx.zeros((2, 2), dtype=mx.uint8), "a.weight_scale_inv": mx.ones((1,))}
    assert fp8_config({}) is None
    assert fp8_config({"quantization_config": {"quant_method": "gptq"}}) is None
    out = dequantize_fp8(dict(weights), {})
    assert all(out[k] is v for k, v in weights.items()) and out.keys() == weights.keys()


def test_single_scale_without_a_block_size() -> None:
    codes, scale, want = encode(np.linspace(-3, 3, 60).reshape(6, 10), (6, 10))
    config = {"quantization_config": {"quant_method": "fp8"}}
    weights = {"a.weight": mx.array(codes), "a.weight_scale_inv": mx.array(scale)}
    out = dequantize_fp8(weights, config, mx.float32)
    assert np.array_equal(np.array(out["a.weight"]), want)


@pytest.mark.parametrize(
    ("weights", "quant", "message"),
    [
        ({"a.weight_scale_inv": mx.ones((2, 2))}, FP8, "no a.weight"),
        (
            {"a.weight": mx.zeros((32, 48)), "a.weight_scale_inv": mx.ones((2, 2))},
            FP8,
            "not FP8 codes",
        ),
        (
            {"a.weight": mx.zeros((32, 48), dtype=mx.uint8), "a.weight_scale_inv": mx.ones((2,))},
            FP8,
            r"needs \(2, 2\)",
        ),
        (
            {"a.weight": mx.zeros((4, 4), dtype=mx.uint8), "a.weight_scale_inv": mx.ones((2, 2))},
            {"quant_method": "fp8"},
            "weight_block_size",
        ),
        ({}, FP8 | {"fmt": "float8_e5m2"}, "e5m2"),
    ],
)
def test_malformed_checkpoints_are_named(weights: dict, quant: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        dequantize_fp8(weights, {"quantization_config": quant})
