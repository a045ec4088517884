"""Moving KV caches between the runner and the prompt cache, in memory and on disk.

Knows the runner's per-layer ``KVCache`` objects, the prompt cache's per-layer
``(keys, values)`` lists, and how their files are named inside (``keys.<i>``, ``values.<i>``):
``tensors`` copies an entry out as plain bytes for the background writer
(``server/engine/prompt_cache_disk.py``), ``load`` reads a file back with ``mx.load``. Runs on the
engine thread only.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from moeserve.models.cache import KVCache
from moeserve.server.engine.prompt_cache_disk import Tensor

KV = list[tuple[mx.array, mx.array]]


def snapshot(caches: list[KVCache]) -> tuple[KV, int]:
    """Copy caches into compact, independent arrays (a view would pin the whole batch buffer).

    Args:
        caches: Per-layer caches of one sequence.

    Returns:
        ``(kv, nbytes)``.
    """
    kv = [(mx.contiguous(k), mx.contiguous(v)) for k, v in (c.state for c in caches)]
    mx.eval(kv)
    return kv, sum(k.nbytes + v.nbytes for k, v in kv)


def restore(kv: KV, length: int) -> list[KVCache]:
    """Fresh caches holding the first ``length`` positions of ``kv``.

    The new caches share nothing writable with ``kv``: appending to them allocates new
    buffers, so the stored entry is never modified (copy-on-write).

    Args:
        kv: Per-layer keys/values.
        length: Positions to reuse.

    Returns:
        Per-layer caches.
    """
    return [KVCache.from_state(k[:, :, :length], v[:, :, :length]) for k, v in kv]


# MLX dtypes a KV cache may hold, by their safetensors names.
_SAFETENSORS_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
}


def tensors(kv: KV) -> dict[str, Tensor]:
    """Turn an entry's KV into plain bytes for the prompt cache's background writer.

    Runs on the engine thread: the writer thread must never touch an ``mx.array``, so the
    data is copied out here.

    Args:
        kv: Per-layer keys/values.

    Returns:
        ``keys.<i>`` / ``values.<i>`` -> ``(dtype, shape, data)``, as ``load`` reads them.

    Raises:
        ValueError: A dtype safetensors has no name for here.
    """
    out: dict[str, Tensor] = {}
    for i, (k, v) in enumerate(kv):
        for name, array in ((f"keys.{i}", k), (f"values.{i}", v)):
            if array.dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"cannot persist a {array.dtype} KV cache")
            array = mx.contiguous(array)
            mx.eval(array)
            out[name] = (
                _SAFETENSORS_DTYPES[array.dtype],
                list(array.shape),
                bytes(memoryview(array)),
            )
    return out


def load(path: Path) -> tuple[list[int], KV, int, dict[str, str]]:
    """Read a file written by ``save``.

    Args:
        path: The file.

    Returns:
        ``(tokens, kv, nbytes, metadata)``.
    """
    import json

    from moeserve.models.loader import check_safetensors

    check_safetensors(path)
    arrays, metadata = mx.load(str(path), return_metadata=True)
    layers = len(arrays) // 2
    kv = [(arrays[f"keys.{i}"], arrays[f"values.{i}"]) for i in range(layers)]
    tokens = json.loads(metadata["tokens"])
    if any(k.shape[2] != len(tokens) for k, _ in kv):
        raise ValueError(f"{path}: cached length does not match its token list")
    return tokens, kv, sum(k.nbytes + v.nbytes for k, v in kv), metadata
