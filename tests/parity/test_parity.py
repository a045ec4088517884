"""Every registered architecture against its reference implementation's golden logits.

The goldens come from transformers (mlx-lm for bailing_moe), computed by
tests/fixtures/make_fixtures.py (the first five families) and tests/fixtures/gen_families.py
(the newer ones, which also record logits of tokens decoded one at a time through the
reference's own cache); nothing here needs torch.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from moeserve.models import load_model
from moeserve.models.loader import build_model, read_json
from moeserve.models.registry import registered_model_types
from tests.helpers import FIXTURES, variants

ATOL = 1e-4
# Every registered model type has fixtures (a variant is named "<model_type>_<letter>").
FAMILIES = tuple(registered_model_types())


def _family(variant: str) -> str:
    return variant.rsplit("_", 1)[0]


def test_every_family_has_fixtures_in_all_layouts() -> None:
    # Guards against the parametrized tests below silently collecting nothing.
    for layout in ("hf", "mlx", "mlx_q4"):
        covered = {_family(v) for v in variants(layout)}
        assert covered == set(FAMILIES), (layout, covered)


def _golden(variant: str, name: str = "golden.safetensors") -> dict[str, mx.array]:
    return mx.load(str(FIXTURES / variant / name))


def _max_diff(a: mx.array, b: mx.array) -> float:
    return mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item()


@pytest.mark.parametrize("variant", variants("hf"))
def test_publisher_layout_matches_reference(variant: str) -> None:
    model, _ = load_model(FIXTURES / variant / "hf", dtype="float32")
    golden = _golden(variant)
    logits = model(golden["input_ids"])
    assert logits.shape == golden["logits"].shape
    assert _max_diff(logits, golden["logits"]) < ATOL


@pytest.mark.parametrize("variant", variants("mlx"))
def test_mlx_layout_matches_reference(variant: str) -> None:
    model, _ = load_model(FIXTURES / variant / "mlx", dtype="float32")
    golden = _golden(variant)
    assert _max_diff(model(golden["input_ids"]), golden["logits"]) < ATOL


def _dequantized_copy(model: nn.Module, config: dict) -> nn.Module:
    """A float model holding exactly the values the quantized model's weights decode to."""
    float_model, _ = build_model({k: v for k, v in config.items() if "quantization" not in k})
    weights = dict(tree_flatten(model.parameters()))
    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    for path, module in leaves:
        if f"{path}.scales" in weights:
            weights[f"{path}.weight"] = mx.dequantize(
                weights[f"{path}.weight"],
                weights.pop(f"{path}.scales"),
                weights.pop(f"{path}.biases", None),
                group_size=module.group_size,
                bits=module.bits,
                mode=module.mode,
            )
    weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    float_model.load_weights(list(weights.items()), strict=True)
    return float_model


@pytest.mark.parametrize("variant", variants("mlx_q4"))
def test_quantized_mlx_layout(variant: str) -> None:
    path = FIXTURES / variant / "mlx_q4"
    # Activations in float32 as in the golden (the checkpoint's scales are float16).
    model, config = load_model(path, dtype="float32")
    ids = _golden(variant)["input_ids"]
    logits = model(ids)
    # 1. the same numbers mlx-lm computes on this quantized checkpoint
    assert _max_diff(logits, _golden(variant, "golden_q4.safetensors")["logits"]) < 1e-3
    # 2. a float model with the dequantized weights: only accumulation order differs
    reference = _dequantized_copy(model, read_json(path / "config.json"))
    assert _max_diff(logits, reference(ids)) < 1e-3
    # 3. the router overrides in config.json were honoured (8-bit modules stay 8-bit)
    for key, setting in config["quantization"].items():
        if isinstance(setting, dict) and "bits" in setting:
            module = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
            if key in module:
                assert module[key].bits == setting["bits"], key


@pytest.mark.parametrize("variant", variants("hf"))
def test_incremental_decode_matches_full_forward(variant: str) -> None:
    model, _ = load_model(FIXTURES / variant / "hf", dtype="float32")
    ids = _golden(variant)["input_ids"]
    full = model(ids)
    cache = model.make_cache()
    steps = [model(ids[:, :4], cache=cache)]
    for t in range(4, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], cache=cache))
    assert _max_diff(mx.concatenate(steps, axis=1), full) < ATOL


@pytest.mark.parametrize("variant", variants("hf"))
def test_last_only_logits_are_the_last_row(variant: str) -> None:
    # What the runner asks for when a prefill chunk finishes a prompt.
    model, _ = load_model(FIXTURES / variant / "hf", dtype="float32")
    ids = _golden(variant)["input_ids"]
    full = model(ids)
    last = model(ids, last_only=True)
    assert last.shape == (full.shape[0], 1, full.shape[2])
    assert _max_diff(last, full[:, -1:]) < ATOL
    cache = model.make_cache()
    model(ids[:, :4], cache=cache)
    assert _max_diff(model(ids[:, 4:], cache=cache, last_only=True), full[:, -1:]) < ATOL


def _with_decode() -> list[str]:
    return [
        v
        for v in variants("hf")
        if (FIXTURES / v / "golden.safetensors").is_file() and "decode_ids" in _golden(v)
    ]


@pytest.mark.parametrize("variant", _with_decode())
@pytest.mark.parametrize("layout", ["hf", "mlx"])
def test_decode_through_the_cache_matches_reference(variant: str, layout: str) -> None:
    # The reference fed these tokens one at a time through its own cache after the prompt:
    # where sliding windows, recurrent state and MLA differ from a full forward pass.
    if not (FIXTURES / variant / layout / "config.json").is_file():
        pytest.skip(f"{variant} has no {layout} layout")
    model, _ = load_model(FIXTURES / variant / layout, dtype="float32")
    golden = _golden(variant)
    cache = model.make_cache()
    assert _max_diff(model(golden["input_ids"], cache=cache), golden["logits"]) < ATOL
    steps = [
        model(golden["decode_ids"][:, t : t + 1], cache=cache)
        for t in range(golden["decode_ids"].shape[1])
    ]
    assert _max_diff(mx.concatenate(steps, axis=1), golden["decode_logits"]) < ATOL
