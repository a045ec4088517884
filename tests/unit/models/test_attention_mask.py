"""moeserve.models.base.attention_mask: which decode steps need an explicit mask."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from moeserve.models import base
from moeserve.models.cache import BatchKVCache, KVCache
from moeserve.models.loader import load_model

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "qwen2_moe_a" / "mlx"


def _cache(length: int) -> KVCache:
    cache = KVCache()
    kv = mx.zeros((1, 2, length, 8))
    cache.update_and_fetch(kv, kv)
    return cache


def test_unpadded_single_token_steps_need_no_mask() -> None:
    even = BatchKVCache.merge([_cache(4), _cache(4)])
    assert base.attention_mask(1, even) is None
    assert base.attention_mask(1, BatchKVCache.merge([_cache(7)])) is None
    padded = BatchKVCache.merge([_cache(4), _cache(2)])
    mask = base.attention_mask(1, padded)
    assert mask.tolist() == [[[[True] * 5]], [[[False, False, True, True, True]]]]
    # Several new tokens always get the causal mask.
    assert base.attention_mask(2, even).shape == (2, 1, 2, 6)


def test_dropping_the_mask_changes_nothing(monkeypatch) -> None:
    model, _ = load_model(FIXTURE, "float32")
    prompt = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])

    def decode_logits() -> mx.array:
        caches = model.make_cache()
        model(prompt, cache=caches)
        batch = [BatchKVCache.merge([c]) for c in caches]
        return model(mx.array([[26]]), cache=batch)[:, -1]

    without = decode_logits()
    real = base.attention_mask

    def always_a_mask(length: int, cache):
        if isinstance(cache, BatchKVCache):
            return cache.make_mask(length)
        return real(length, cache)

    monkeypatch.setattr(base, "attention_mask", always_a_mask)
    with_mask = decode_logits()
    assert base.attention_mask(1, BatchKVCache.merge([_cache(3)])) is not None
    assert mx.array_equal(without, with_mask).item()
