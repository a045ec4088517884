"""How many bytes running sequences' KV caches may hold: the ``kv_cache_max_bytes`` setting.

Knows the machine's memory (Metal's recommended working set on the GPU, physical memory on
the CPU), the default share of it the KV cache gets, and, given a model's ``CacheLayout``,
the longest sequence a budget holds. Knows nothing of HTTP or of how the scheduler spends the
budget (``server/engine/limits.py``'s ``KVBudget``); ``server/startup.py`` resolves the
setting with these functions once the model is loaded, and the routes cap a request's default
``max_tokens`` with ``longest_row``.

The default, when ``kv_cache_max_bytes`` is unset::

    memory = Metal's max_recommended_working_set_size, else physical memory
    left   = memory - weights - prompt_cache_max_bytes (0 without the prompt cache)
    budget = max(left * KV_MEMORY_FRACTION, min(one_row, memory - weights))

where ``one_row`` is what one ``max_model_len`` sequence holds: a long request still runs
when the machine can hold it beside the weights, even if the prompt cache's budget leaves
less. When even that leaves nothing (weights as large as the memory), the budget is
``one_row``: one sequence at a time rather than none. ``0`` means no byte bound at all.
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx

from moeserve.models.backend import is_cpu
from moeserve.models.cache import CacheLayout

logger = logging.getLogger(__name__)

# The share of what is left after the weights and the prompt cache's budget that running
# sequences may hold. Half leaves the other half for activations (which grow with
# max_batched_tokens), MLX's buffer cache, the tokenizer and the rest of the process.
KV_MEMORY_FRACTION = 0.5

# Keys of mx.device_info() that give a GPU's usable memory, best first. Metal's recommended
# working set is what macOS lets the GPU keep wired without paging; CUDA reports total_memory.
_DEVICE_MEMORY_KEYS = ("max_recommended_working_set_size", "memory_size", "total_memory")


def physical_memory() -> int | None:
    """The machine's physical memory.

    Returns:
        Bytes, or None where the system does not say.
    """
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # no sysconf, or no such name (Windows)
        return None
    return pages * size if pages > 0 and size > 0 else None


def device_memory() -> int | None:
    """The memory MLX computes in: the GPU's working set on Metal, else physical memory.

    Returns:
        Bytes, or None when neither MLX nor the system says.
    """
    if not is_cpu():
        try:
            info = mx.device_info()
        except Exception:  # an MLX without it: fall back to the machine's figure
            info = {}
        for key in _DEVICE_MEMORY_KEYS:
            value = info.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    # MLX's CPU backend (Linux, a container) has no device figure: the whole machine's.
    return physical_memory()


def default_kv_cache_bytes(memory: int, weights: int, prompt_cache: int, one_row: int) -> int:
    """The default budget (formula in the module docstring).

    Args:
        memory: The memory MLX computes in (``device_memory``).
        weights: Bytes of the model's weights.
        prompt_cache: The prompt cache's budget (0 when it is off).
        one_row: Bytes one ``max_model_len`` sequence holds.

    Returns:
        Bytes, at least 1.
    """
    beside_weights = max(memory - weights, 0)
    share = int(max(beside_weights - prompt_cache, 0) * KV_MEMORY_FRACTION)
    budget = max(share, min(one_row, beside_weights))
    return budget if budget > 0 else max(one_row, 1)


def longest_row(layout: CacheLayout, max_bytes: int, prefill_chunk: int, limit: int) -> int:
    """The most positions one sequence can reach within ``max_bytes``, up to ``limit``.

    It is the scheduler's admission rule (``Scheduler._check_fits``) solved for the length:
    a row of ``p`` positions written ``min(prefill_chunk, p)`` at a time must fit.

    Args:
        layout: The model's cache layout.
        max_bytes: The budget.
        prefill_chunk: The scheduler's longest prefill chunk.
        limit: The longest length worth asking about (``max_model_len``).

    Returns:
        Positions, 0 when not even one fits.
    """
    lo, hi = 0, max(limit, 0)  # row_bytes grows with the positions: bisect the last that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if layout.row_bytes(mid, min(prefill_chunk, mid)) <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def resolve_kv_cache_max_bytes(
    setting: int | None,
    layout: CacheLayout,
    *,
    weights: int,
    prompt_cache: int,
    max_model_len: int,
    prefill_chunk: int,
    memory: int | None = None,
) -> int | None:
    """The KV budget to serve with: the setting, else the machine's default.

    Args:
        setting: ``Settings.kv_cache_max_bytes``: None for the default, 0 for no bound.
        layout: The model's cache layout.
        weights: Bytes of the model's weights.
        prompt_cache: The prompt cache's budget (0 when it is off).
        max_model_len: The served context length.
        prefill_chunk: The scheduler's longest prefill chunk.
        memory: The memory figure to use; None asks ``device_memory``.

    Returns:
        Bytes, or None for no byte bound (``0``, or the memory is unknown).
    """
    one_row = layout.row_bytes(max_model_len, min(prefill_chunk, max_model_len))
    if setting == 0:
        return None
    if setting is not None:
        budget = setting
    else:
        memory = device_memory() if memory is None else memory
        if memory is None:
            logger.warning(
                "cannot tell this machine's memory: running sequences' KV caches are bounded "
                "by max_running only; set kv_cache_max_bytes to bound them in bytes"
            )
            return None
        budget = default_kv_cache_bytes(memory, weights, prompt_cache, one_row)
    if budget < one_row:
        # Allowed (a small machine, or a deliberate cap); requests longer than this get 400.
        longest = longest_row(layout, budget, prefill_chunk, max_model_len)
        logger.warning(
            "kv_cache_max_bytes %d holds one sequence of at most %d tokens (max_model_len is "
            "%d): longer requests will be refused",
            budget,
            longest,
            max_model_len,
        )
    return budget
