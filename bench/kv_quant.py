"""What ``kv_cache_bits`` costs in exactness and speed, on the bench checkpoint.

For a 300-token prompt followed by 64 teacher-forced tokens (the float run's own greedy
choices), the float cache and the 8- and 4-bit caches (``CacheLayout.quantized``) each give
logits at every decode position; reported: the largest absolute logit difference against the
float cache, that difference relative to the logits' spread, and how often the greedy token
agrees. Speed: one decode step of B rows at ~300 positions (``step_profile``'s store,
quantized or not), interleaved rounds, medians; and the bytes per token.

It knows the cache's public API and the bench checkpoint; it does not judge quality beyond
logits (no perplexity corpus here).

Usage: python -m bench.kv_quant [--rounds 5] [--batch 1 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from moeserve.models.cache import CacheStore, SequenceCache, StepCache
from moeserve.models.loader import load_model

BITS = (None, 8, 4)


def _cache(model, bits: int | None) -> SequenceCache:
    return SequenceCache(CacheStore(model.cache_layout().quantized(bits), model.cache_dtype()))


def exactness(model, prompt_len: int = 300, steps: int = 64) -> dict[str, dict[str, float]]:
    """Logit differences of the quantized caches against the float one, teacher-forced.

    Args:
        model: The bench model.
        prompt_len: Prompt tokens.
        steps: Decode positions compared.

    Returns:
        Per bits: max abs difference, that over the logits' spread, greedy agreement.
    """
    prompt = mx.random.randint(0, 4000, (1, prompt_len), key=mx.random.key(1))
    caches = {b: _cache(model, b) for b in BITS}
    logits = {b: model(prompt, cache=caches[b], last_only=True)[:, -1] for b in BITS}
    diffs: dict[int, list[float]] = {b: [] for b in BITS if b}
    agree: dict[int, int] = {b: 0 for b in BITS if b}
    spreads = []
    for _ in range(steps):
        ref = logits[None]
        token = mx.argmax(ref, axis=-1)
        spreads.append((mx.max(ref) - mx.min(ref)).item())
        for b in diffs:
            diffs[b].append(mx.abs(logits[b] - ref).max().item())
            agree[b] += int(mx.argmax(logits[b], axis=-1).item() == token.item())
        step = token.reshape(1, 1)
        logits = {b: model(step, cache=caches[b])[:, -1] for b in BITS}
    spread = statistics.median(spreads)
    return {
        f"{b}-bit": {
            "max_abs_diff": max(diffs[b]),
            "max_diff_over_spread": max(diffs[b]) / spread,
            "greedy_agreement": agree[b] / steps,
        }
        for b in diffs
    }


def _step(model, bits: int | None, rows: int):
    prompt = mx.random.randint(0, 4000, (1, 300), key=mx.random.key(0))
    store = CacheStore(model.cache_layout().quantized(bits), model.cache_dtype())
    ids = []
    for r in range(rows):
        ids.append(f"r{r}")
        store.add(ids[-1])
        n = 300 - r % 7
        mx.eval(model(prompt[:, :n], cache=StepCache(store, [ids[-1]], n), last_only=True))
    tokens = mx.zeros((rows, 1), dtype=mx.int32)

    def step() -> None:
        mx.eval(model(tokens, cache=StepCache(store, ids, 1)))
        for seq_id in ids:  # back one position: every call does the same work
            store.rows[seq_id].length -= 1

    return step


def speed(model, batches: list[int], rounds: int) -> dict[str, dict[str, float]]:
    """Decode step time per bits and batch (ms, medians of interleaved rounds).

    Args:
        model: The bench model.
        batches: Row counts.
        rounds: Interleaved rounds.

    Returns:
        ``{"B=16": {"float": ms, "8-bit": ms, "4-bit": ms}, ...}``.
    """
    out = {}
    for rows in batches:
        steps = {b: _step(model, b, rows) for b in BITS}
        times: dict[int | None, list[float]] = {b: [] for b in BITS}
        for _ in range(rounds):
            for b, fn in steps.items():
                fn()
                t = time.perf_counter()
                for _ in range(5):
                    fn()
                times[b].append((time.perf_counter() - t) / 5 * 1e3)
        out[f"B={rows}"] = {
            (f"{b}-bit" if b else "float"): round(statistics.median(v), 2) for b, v in times.items()
        }
    return out


def main() -> None:
    """Print exactness, speed and bytes per token."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    model, _ = load_model(ensure_checkpoint(DEFAULT_DIR), "float32")
    layout = model.cache_layout()
    for b in BITS:
        print(f"bytes per token, {b or 32}-bit: {layout.quantized(b).bytes_per_token}")
    for name, row in exactness(model).items():
        print(name, {k: round(v, 4) for k, v in row.items()})
    for name, row in speed(model, args.batch, args.rounds).items():
        print("decode step", name, row)


if __name__ == "__main__":
    main()
