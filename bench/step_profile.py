"""Where a decode step's time goes on the bench model: each part's share, by leaving it out.

MLX evaluates a step's graph as a whole, so timing a part on its own misses how it overlaps
with the rest, and evaluating after every part inflates the small ones. Instead this times
whole decode steps (batch B, context ~300, the engine's paged ``CacheStore``, with the
per-step ``StepCache`` views built as the engine builds them) with one part of every layer
replaced by something free of cost, and reports the difference from the full
step as that part's cost:

* routed experts and router: the Qwen2-MoE block keeps only its gated shared expert;
* shared expert: the block keeps only the router and the routed experts;
* attention core: RoPE, the cache write and the attention itself (the q/k/v/o projections
  stay, so that the rest of the layer sees the same shapes);
* q/k/v/o projections: what the attention layer costs beyond its core;
* the rest: a step with no MoE block and no attention at all (embedding, norms, residuals,
  head, argmax).

The parts overlap in MLX's evaluation (two cores, one graph), so they need not add up to the
full step; the table shows their sum next to it. Variants are interleaved (each once per
round, median of the rounds): the machine is shared.

Usage: python -m bench.step_profile [--batch 1 16] [--rounds 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from moeserve.models import qwen2_moe
from moeserve.models.cache import CacheStore, StepCache
from moeserve.models.layers import attention
from moeserve.models.layers.moe import combine_experts, softmax_topk
from moeserve.models.loader import load_model

_FULL_MOE = qwen2_moe.SparseMoeBlock.__call__
_FULL_ATTENTION = attention.Attention.__call__


def _shared_only(self, x: mx.array) -> mx.array:
    return mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def _routed_only(self, x: mx.array) -> mx.array:
    inds, weights = softmax_topk(self.gate(x), self.top_k, self.renormalize_p)
    return combine_experts(self.switch_mlp(x, inds), weights)


def _projections_only(self, x: mx.array, mask, cache) -> mx.array:
    q, _, _ = self._project(x)  # k and v are computed and dropped, as in a real step
    return self.o_proj(q)


def _nothing(self, x: mx.array, *_args) -> mx.array:
    return x


# name -> (MoE block, attention layer)
VARIANTS = {
    "full": (_FULL_MOE, _FULL_ATTENTION),
    "no routed": (_shared_only, _FULL_ATTENTION),
    "no shared": (_routed_only, _FULL_ATTENTION),
    "no attention core": (_FULL_MOE, _projections_only),
    "no attention": (_FULL_MOE, _nothing),
    "bare": (_nothing, _nothing),
}


def prefilled_store(model, lengths: list[int]) -> tuple[CacheStore, list[str]]:
    """A store holding one row per length, each prefilled with the same random prompt.

    Args:
        model: A loaded model of the bench checkpoint's vocabulary.
        lengths: Prompt length of each row (at most 4,000).

    Returns:
        The store (the engine's ``CacheStore`` for the model's layout) and the row ids.
    """
    prompt = mx.random.randint(0, 4000, (1, max(lengths)), key=mx.random.key(0))
    store = CacheStore(model.cache_layout(), model.cache_dtype())
    ids = []
    for r, n in enumerate(lengths):
        ids.append(f"row{r}")
        store.add(ids[-1])
        cache = StepCache(store, [ids[-1]], n)  # one prefill pass, as the runner's chunk
        mx.eval(model(prompt[:, :n], cache=cache, last_only=True), cache.arrays())
    return store, ids


def decode_step(model, rows: int) -> Callable[[], mx.array]:
    """A function that runs one decode step of ``rows`` rows at a fixed context (~300 tokens).

    The rows are prefilled to slightly different lengths (300, 297, ...) in one
    ``CacheStore``; each step builds the views for all rows (``StepCache(store, ids, 1)``,
    write and gather indices and the padding mask, as the engine's runner does) and runs the
    model. After each step every row's length goes back one position (its blocks stay), so
    every call does the same work.

    Args:
        model: A loaded model of the bench checkpoint's vocabulary.
        rows: Batch size.

    Returns:
        The step; it returns the greedy tokens ``[rows]``, evaluated.
    """
    store, ids = prefilled_store(model, [300 - 3 * r for r in range(rows)])
    tokens = mx.zeros((rows, 1), dtype=mx.int32)

    def step() -> mx.array:
        out = mx.argmax(model(tokens, cache=StepCache(store, ids, 1))[:, -1, :], axis=-1)
        mx.eval(out)
        for seq_id in ids:  # keep the context length fixed from step to step
            store.rows[seq_id].length -= 1
        return out

    return step


def profile(model, rows: int, rounds: int, steps: int = 10) -> dict[str, float]:
    """Median ms per decode step of each variant.

    Args:
        model: The bench model.
        rows: Batch size.
        rounds: Interleaved rounds.
        steps: Steps timed per variant and round.

    Returns:
        Variant name -> ms.
    """
    step = decode_step(model, rows)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for _ in range(rounds):
            for name, (moe_call, attention_call) in VARIANTS.items():
                qwen2_moe.SparseMoeBlock.__call__ = moe_call
                attention.Attention.__call__ = attention_call
                step()  # warm up this variant's graph shapes
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                times[name].append((time.perf_counter() - start) / steps * 1000)
    finally:
        qwen2_moe.SparseMoeBlock.__call__ = _FULL_MOE
        attention.Attention.__call__ = _FULL_ATTENTION
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    """Print one markdown table per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    ensure_checkpoint(args.model)
    model, _ = load_model(args.model, "float32")
    for rows in args.batch:
        ms = profile(model, rows, args.rounds)
        full = ms["full"]
        parts = {
            "routed experts (with the router)": full - ms["no routed"],
            "shared expert": full - ms["no shared"],
            "attention core (RoPE, cache write, attention)": full - ms["no attention core"],
            "q/k/v/o projections": ms["no attention core"] - ms["no attention"],
        }
        parts["the rest (embedding, norms, residuals, head)"] = ms["bare"]
        print(f"\nDecode step, batch {rows}: {full:.1f} ms\n")
        print("| part | ms | share of the step |\n|---|---|---|")
        for name, value in parts.items():
            print(f"| {name} | {value:.1f} | {value / full:.0%} |")
        total = sum(parts.values())
        print(f"| sum of the parts | {total:.1f} | {total / full:.0%} |")


if __name__ == "__main__":
    main()
