"""Moving cache snapshots between the prompt cache and disk.

Knows ``models.cache.Snapshot`` (one row's state: per-layer tensors, where each layer's
positions start, and recurrent states at earlier turn boundaries) and how its file names the
parts: ``layer.<i>.<j>`` is tensor j of layer i, ``starts`` the int32 start per layer, and
``boundary.<position>.<r>.<j>`` tensor j of the r-th recurrent layer's state at ``position``.
``tensors`` copies a snapshot out as plain bytes for the background writer
(``server/engine/prompt_cache_disk.py``); ``load`` reads a file back with ``mx.load``. Runs on
the engine thread only. It does not know which snapshot fits which model: a file of another
model is told apart by the prompt cache's fingerprint, and a layout mismatch fails the reuse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from moeserve.models.cache import Snapshot
from moeserve.server.engine.prompt_cache_disk import Tensor

# MLX dtypes a cache may hold, by their safetensors names.
_SAFETENSORS_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.int32: "I32",
}
_BOUNDARY = re.compile(r"boundary\.(\d+)\.(\d+)\.(\d+)")


def _plain(array: mx.array) -> Tensor:
    if array.dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"cannot persist a {array.dtype} cache")
    array = mx.contiguous(array)
    mx.eval(array)
    return (_SAFETENSORS_DTYPES[array.dtype], list(array.shape), bytes(memoryview(array)))


def tensors(snap: Snapshot) -> dict[str, Tensor]:
    """Turn a snapshot into plain bytes for the prompt cache's background writer.

    Runs on the engine thread: the writer thread must never touch an ``mx.array``, so the
    data is copied out here.

    Args:
        snap: The snapshot.

    Returns:
        Name -> ``(dtype, shape, data)``, as ``load`` reads them.

    Raises:
        ValueError: A dtype safetensors has no name for here.
    """
    out: dict[str, Tensor] = {"starts": _plain(mx.array(snap.starts, dtype=mx.int32))}
    for i, layer in enumerate(snap.layers):
        for j, array in enumerate(layer):
            out[f"layer.{i}.{j}"] = _plain(array)
    for position, states in snap.boundaries.items():
        for r, state in enumerate(states):
            for j, array in enumerate(state):
                out[f"boundary.{position}.{r}.{j}"] = _plain(array)
    return out


def load(path: Path) -> tuple[list[int], Snapshot, int, dict[str, str]]:
    """Read a file written from ``tensors``.

    Args:
        path: The file.

    Returns:
        ``(tokens, snapshot, nbytes, metadata)``.

    Raises:
        ValueError: The file is not a snapshot of this format.
    """
    from moeserve.models.loader import check_safetensors

    check_safetensors(path)
    arrays, metadata = mx.load(str(path), return_metadata=True)
    tokens = json.loads(metadata["tokens"])
    starts = arrays["starts"].tolist()
    layers = []
    for i in range(len(starts)):
        layer = []
        while f"layer.{i}.{len(layer)}" in arrays:
            layer.append(arrays[f"layer.{i}.{len(layer)}"])
        layers.append(tuple(layer))
    boundaries: dict[int, list[list[mx.array]]] = {}
    for name in sorted(arrays):
        if match := _BOUNDARY.fullmatch(name):
            position, r, _ = (int(g) for g in match.groups())
            states = boundaries.setdefault(position, [])
            while len(states) <= r:
                states.append([])
            states[r].append(arrays[name])
    snap = Snapshot(
        len(tokens),
        layers,
        starts,
        {p: [tuple(s) for s in states] for p, states in boundaries.items()},
    )
    for layer, start in zip(layers, starts):
        if layer and layer[0].ndim == 4 and layer[0].shape[2] != len(tokens) - start:
            raise ValueError(f"{path}: cached length does not match its token list")
    return tokens, snap, snap.nbytes, metadata
