"""``moeserve convert`` on the newer families' publisher fixtures, against mlx-lm's own output.

The reference is independent of our code: ``tests/fixtures/models/<variant>/mlx_q4`` was
written by mlx-lm (its ``load_model``, cast and ``quantize_model`` with the model's own
quantization predicate; ``tests/fixtures/gen_families.py``). Converting the publisher's
``hf/`` checkpoint must reproduce it tensor for tensor, with the same per-module overrides in
``config.json``, and the float conversion must still give the transformers golden.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from moeserve.models import load_model
from moeserve.models.convert import convert
from moeserve.models.loader import read_json
from tests.helpers import FIXTURES

# Variants with an mlx-lm-written mlx_q4/ (one per family).
VARIANTS = ("qwen3_moe_a", "mixtral_a", "qwen3_next_a", "qwen3_5_moe_a")


def _tensors(directory: Path) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(mx.load(str(shard)))
    return out


def _overrides(config: dict) -> dict:
    return {k: v for k, v in config["quantization"].items() if isinstance(v, dict)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_convert_matches_mlx_lm(variant: str, tmp_path: Path) -> None:
    fixture = FIXTURES / variant
    if not (fixture / "mlx_q4" / "config.json").is_file():
        pytest.skip(f"{variant} fixtures are not generated")
    golden = mx.load(str(fixture / "golden.safetensors"))

    convert(fixture / "hf", tmp_path / "float")
    model, _ = load_model(tmp_path / "float", dtype="float32")
    logits = model(golden["input_ids"])
    assert mx.max(mx.abs(logits - golden["logits"])).item() < 1e-4

    config = convert(fixture / "hf", tmp_path / "q4", quantize=True, bits=4, group_size=64)
    assert _overrides(config) == _overrides(read_json(fixture / "mlx_q4" / "config.json"))
    ours, theirs = _tensors(tmp_path / "q4"), _tensors(fixture / "mlx_q4")
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype, name
        assert mx.array_equal(ours[name], value).item(), name
