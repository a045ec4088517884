"""Find a checkpoint and read its files: the directory, its JSON and its safetensors weights.

Knows: local directories and Hugging Face repo ids (through ``huggingface_hub``, honouring
``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``), JSON files such as ``config.json``, single-file and
sharded safetensors (the shard index, truncated files), and reading only the tensors one rank
wants. Every failure raises a ``models.errors`` exception whose message names the file or key.
Knows nothing about the model a checkpoint builds, its layouts, quantization or dtypes
(``models.loader``), nor about tokenizers, HTTP or serving.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from moeserve.models.errors import CheckpointError, ConfigError, ModelNotFoundError

# What a model directory needs from a Hub repo; skips other formats (.bin, .gguf, .pth).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """Find the local directory for a path or a Hugging Face repo id, downloading if allowed.

    Args:
        path_or_repo: A directory, or a repo id such as ``mlx-community/Qwen1.5-MoE-A2.7B-4bit``.

    Returns:
        A directory containing ``config.json``.

    Raises:
        ModelNotFoundError: Neither a model directory nor a resolvable repo id.
    """
    local = Path(path_or_repo).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local} has no config.json; is it a model directory?")
        return local
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFoundError(
            f"model {text!r} is neither an existing directory nor a Hugging Face repo id "
            "of the form 'owner/name'"
        )
    return _download(text)


def _download(repo_id: str) -> Path:
    """Resolve a repo id through the Hub cache (download unless offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=HUB_PATTERNS,
                local_files_only=offline,
                # Read at call time (huggingface_hub reads it once, at import).
                cache_dir=os.environ.get("HF_HUB_CACHE"),
            )
        )
    except LocalEntryNotFoundError as e:
        how = (
            f"HF_HUB_OFFLINE is set, so it cannot be downloaded now. Fetch it once with "
            f"`hf download {repo_id}` while online (or unset HF_HUB_OFFLINE), or pass a "
            "local directory instead."
            if offline
            else "it could not be downloaded (no network?). Pass a local directory instead."
        )
        raise ModelNotFoundError(f"model {repo_id!r} is not in the local Hub cache: {how}") from e
    except HfHubHTTPError as e:
        raise ModelNotFoundError(f"could not fetch {repo_id!r} from the Hub: {e}") from e


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    """Read a JSON object from ``path``.

    Args:
        path: File to read.
        required: Raise if missing (else return ``{}``).

    Returns:
        The parsed object.

    Raises:
        ConfigError: Missing (when required), unreadable or not an object.
    """
    if not path.is_file():
        if required:
            raise ConfigError(f"{path} is missing")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def check_safetensors(file: Path) -> None:
    """Check that a safetensors file's header parses and its data is all there.

    MLX would otherwise fail on a truncated file with a message that names neither the file
    nor the problem.

    Args:
        file: The file.

    Raises:
        CheckpointError: Truncated or not a safetensors file.
    """
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not a valid safetensors file ({e})") from e
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise CheckpointError(
            f"{file} is truncated: its header describes {needed} bytes but the file has {size}; "
            "re-download or re-convert it"
        )


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint (from the shard index if there is one).

    Args:
        path: Model directory.

    Returns:
        The files, in a stable order.

    Raises:
        CheckpointError: No weights, or a shard named by the index is missing.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index.name} names shard(s) missing from {path}: {missing}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    return files


def read_weights(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, mx.array]:
    """Load the tensors of a checkpoint, or only those ``keep`` accepts.

    With ``keep`` (one rank of a distributed server: ``models.shard``), the shard index says
    which files hold a wanted tensor and the others are not opened; of the files opened, the
    unwanted tensors are dropped before anything is evaluated, so they are never read.

    Args:
        path: Model directory.
        keep: Which checkpoint names to load; None loads every tensor.

    Returns:
        Tensor name -> array (lazy until evaluated).
    """
    files = weight_files(path)
    index = path / "model.safetensors.index.json"
    if keep is not None and index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        wanted = {path / f for name, f in weight_map.items() if keep(name)}
        files = [f for f in files if f in wanted]
    weights: dict[str, mx.array] = {}
    for file in files:
        check_safetensors(file)
        try:
            tensors = mx.load(str(file))
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"could not read {file}: {e}") from e
        weights.update((k, v) for k, v in tensors.items() if keep is None or keep(k))
    return weights
