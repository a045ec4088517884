"""Loader behaviour on real (tiny) checkpoints: layouts, shards, dtype, and every error path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from moeserve.models import load, load_model
from moeserve.models.convert import convert
from moeserve.models.errors import (
    CheckpointError,
    ConfigError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from moeserve.models.registry import supported_model_types
from tests.helpers import FIXTURES

SHARDED = FIXTURES / "qwen2_moe_a" / "hf"  # the fixture written as two shards + index
SINGLE = FIXTURES / "granitemoe_a" / "hf"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A private copy of a single-file checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(SINGLE, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_sharded_checkpoint_loads_through_its_index() -> None:
    assert (SHARDED / "model.safetensors.index.json").is_file()
    model, config = load_model(SHARDED)
    assert config["model_type"] == "qwen2_moe"
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, config["vocab_size"])


def test_dtype_option_casts_floating_weights() -> None:
    loaded = load(SINGLE, dtype="bfloat16")
    emb = loaded.model.model.embed_tokens.weight
    assert emb.dtype == mx.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load(SINGLE, dtype="float8")


def test_unsupported_model_type_lists_supported(ckpt: Path) -> None:
    _edit_config(ckpt, model_type="llama")
    with pytest.raises(UnsupportedModelError) as err:
        load_model(ckpt)
    assert "'llama'" in str(err.value)
    for name in ("qwen2_moe", "glm4_moe", "bailing_moe", "granitemoe", "dbrx"):
        assert name in str(err.value)
    assert set(supported_model_types()) >= {"qwen2_moe", "dbrx"}


def test_architectures_alias_resolves_without_model_type(ckpt: Path) -> None:
    _edit_config(ckpt, model_type=None, architectures=["GraniteMoeForCausalLM"])
    model, _ = load_model(ckpt)
    assert model(mx.array([[1, 2]])).ndim == 3


def test_missing_required_config_key_is_named(ckpt: Path) -> None:
    _edit_config(ckpt, num_hidden_layers=None)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_model(ckpt)


def test_missing_and_corrupt_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        load_model(ckpt)


def _rewrite_weights(path: Path, edit) -> None:
    file = path / "model.safetensors"
    weights = mx.load(str(file))
    edit(weights)
    mx.save_safetensors(str(file), weights)


def test_missing_weight_is_named(ckpt: Path) -> None:
    _rewrite_weights(ckpt, lambda w: w.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing .*model\.norm\.weight"):
        load_model(ckpt)


def test_unexpected_weight_is_named(ckpt: Path) -> None:
    _rewrite_weights(ckpt, lambda w: w.update({"model.extra.weight": mx.zeros((2,))}))
    with pytest.raises(CheckpointError, match=r"unexpected .*model\.extra\.weight"):
        load_model(ckpt)


def test_shape_mismatch_is_named(ckpt: Path) -> None:
    _rewrite_weights(ckpt, lambda w: w.update({"model.norm.weight": mx.ones((3,))}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(3,\)"):
        load_model(ckpt)


def test_truncated_safetensors_is_named(ckpt: Path) -> None:
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_model(ckpt)


def test_corrupt_safetensors_header_is_named(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(ckpt)


def test_no_weights_at_all(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(ckpt)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    dst = tmp_path / "sharded"
    shutil.copytree(SHARDED, dst)
    victim = sorted(dst.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(dst)


def test_torch_side_quantization_is_refused(ckpt: Path) -> None:
    _edit_config(ckpt, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(CheckpointError, match="'gptq' is not supported"):
        load_model(ckpt)


def test_path_that_is_neither_dir_nor_repo() -> None:
    with pytest.raises(ModelNotFoundError, match="neither an existing directory"):
        load_model("./no/such/dir")


def test_offline_uncached_repo_says_how_to_get_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        load_model("mlx-community/not-a-real-model-4bit")
    message = str(err.value)
    assert (
        "HF_HUB_OFFLINE" in message and "hf download mlx-community/not-a-real-model-4bit" in message
    )


def test_repo_id_resolves_from_local_hub_cache(monkeypatch, tmp_path: Path) -> None:
    # Lay out a Hub cache entry by hand, the way huggingface_hub stores a snapshot.
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-granite"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(SINGLE, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _, config = load_model("acme/tiny-granite")
    assert config["model_type"] == "granitemoe"


def test_convert_round_trip_float_and_quantized(tmp_path: Path) -> None:
    ids = mx.array([[3, 1, 4, 1, 5, 9]])
    reference = load_model(SINGLE, dtype="float32")[0](ids)
    convert(SINGLE, tmp_path / "f32", dtype="float32")
    again = load_model(tmp_path / "f32")[0](ids)
    assert mx.max(mx.abs(again - reference)).item() < 1e-5
    config = convert(SINGLE, tmp_path / "q4", quantize=True, bits=4, group_size=64, dtype="float32")
    assert config["quantization"]["bits"] == 4
    # The model's own rule keeps the router at 8 bits.
    assert any(isinstance(v, dict) and v.get("bits") == 8 for v in config["quantization"].values())
    quantized = load_model(tmp_path / "q4")[0](ids)
    assert quantized.shape == reference.shape
    with pytest.raises(FileExistsError):
        convert(SINGLE, tmp_path / "q4")
