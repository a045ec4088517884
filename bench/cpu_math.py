"""MLX's CPU transcendentals against ``models.backend.fastmath``, and what that does to the model.

Four tables; the timed ones are interleaved (every variant once per round, the median of the
rounds) because the machine is shared:

1. elementwise, on 2M float32 elements: ``mx.exp`` vs ``fastmath.exp``, ``mx.softmax`` vs
   ``fastmath.softmax``, ``silu(g) * u`` vs ``fastmath.swiglu``;
2. causal prefill attention of the bench model's shape (8 query heads, 4 KV heads, head dim
   64) for a 512-token chunk after 0, 512 and 1,536 cached tokens: MLX's
   ``scaled_dot_product_attention`` vs the CPU backend's ``sdpa`` (blocked);
3. the bench checkpoint end to end: a 512-token prefill chunk, a 2,000-token prompt in
   512-token chunks, and one decode step at batch 1 and 16 (context ~300), with
   the compiled kernels off and on (``cpu_fast_math``);
4. how many MLX graph ops one batch-1 decode step evaluates (``mx.export_to_dot``): on the
   CPU backend each costs a few µs of dispatch on top of its arithmetic.

Usage: python -m bench.cpu_math [--rounds 5] [--model DIR] [--skip-model (tables 1-2 only)]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from bench.step_profile import decode_step, prefilled_store
from moeserve.models import backend
from moeserve.models.backend import fastmath
from moeserve.models.cache import StepCache
from moeserve.models.loader import load_model


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds per call of each variant, timed round-robin after one warm-up.

    Args:
        variants: Name -> a function returning what to evaluate.
        rounds: Timed calls per variant.

    Returns:
        Name -> median ms.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            mx.eval(fn())
            if r:  # round 0 warms up (and compiles)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def _with_fastmath(on: bool, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        backend.set_fast_math(on)
        return fn()

    return run


def elementwise(rounds: int) -> None:
    """Table 1."""
    x = mx.random.normal((4, 1024, 512)) * 4
    up = mx.random.normal(x.shape)
    mx.eval(x, up)
    t = interleaved(
        {
            "mx.exp": lambda: mx.exp(x),
            "fastmath.exp": lambda: fastmath.exp(x),
            "mx.softmax": lambda: mx.softmax(x, axis=-1),
            "fastmath.softmax": lambda: fastmath.softmax(x),
            "silu(g) * u": lambda: nn.silu(x) * up,
            "fastmath.swiglu": lambda: fastmath.swiglu(x, up),
        },
        rounds,
    )
    print("\n| op on 2M float32 | MLX ms | fastmath ms | speed-up |\n|---|---|---|---|")
    for op, mlx_name, fast_name in (
        ("exp", "mx.exp", "fastmath.exp"),
        ("softmax (last axis)", "mx.softmax", "fastmath.softmax"),
        ("SwiGLU", "silu(g) * u", "fastmath.swiglu"),
    ):
        a, b = t[mlx_name], t[fast_name]
        print(f"| {op} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


def prefill_attention(rounds: int) -> None:
    """Table 2."""
    backend.set_fast_math(True)
    print("\n| chunk x keys | MLX sdpa ms | blocked ms | speed-up |\n|---|---|---|---|")
    for cached in (0, 512, 1536):
        L, S = 512, cached + 512
        q = mx.random.normal((1, 8, L, 64))
        k, v = mx.random.normal((1, 4, S, 64)), mx.random.normal((1, 4, S, 64))
        mx.eval(q, k, v)
        t = interleaved(
            {
                "sdpa": lambda q=q, k=k, v=v: mx.fast.scaled_dot_product_attention(
                    q, k, v, scale=0.125, mask="causal"
                ),
                "blocked": lambda q=q, k=k, v=v: backend.sdpa(q, k, v, scale=0.125, mask="causal"),
            },
            rounds,
        )
        ratio = t["sdpa"] / t["blocked"]
        print(f"| {L} x {S} | {t['sdpa']:.1f} | {t['blocked']:.1f} | {ratio:.2f}x |")


def end_to_end(model_dir: Path, rounds: int) -> None:
    """Table 3."""
    model, _ = load_model(model_dir, "float32")
    prompt = mx.random.randint(0, 4000, (1, 2000), key=mx.random.key(0))

    def prefill(n: int) -> mx.array:
        cache = model.make_cache()  # one sequence's store; each call writes after the last
        for start in range(0, n, 512):
            out = model(prompt[:, start : min(n, start + 512)], cache=cache)
            pools = cache.store.pools
            mx.eval(out[:, -1], [a for p in pools for arrays in p.arrays.values() for a in arrays])
        return out[:, -1]

    work = {
        "512-token chunk": lambda: prefill(512),
        "2,000-token prompt": lambda: prefill(2000),
        "decode step, batch 1": decode_step(model, 1),
        "decode step, batch 16": decode_step(model, 16),
    }
    variants = {}
    for name, fn in work.items():
        variants[f"{name}|off"] = _with_fastmath(False, fn)
        variants[f"{name}|on"] = _with_fastmath(True, fn)
    t = interleaved(variants, rounds)
    backend.set_fast_math(True)
    print("\n| bench model | fastmath off ms | on ms | speed-up |\n|---|---|---|---|")
    for name in work:
        off, on = t[f"{name}|off"], t[f"{name}|on"]
        print(f"| {name} | {off:.1f} | {on:.1f} | {off / on:.2f}x |")


def count_ops(model_dir: Path) -> None:
    """Table 4."""
    model, _ = load_model(model_dir, "float32")
    store, ids = prefilled_store(model, [300])
    step = StepCache(store, ids, 1)  # the engine's decode views for a batch of one
    out = mx.argmax(model(mx.zeros((1, 1), dtype=mx.int32), cache=step)[:, -1, :], axis=-1)
    with tempfile.TemporaryDirectory() as tmp:
        dot = Path(tmp) / "step.dot"
        mx.export_to_dot(str(dot), out)
        ops = re.findall(r'label ="([A-Za-z]+)', dot.read_text())
    common = ", ".join(f"{name} {n}" for name, n in Counter(ops).most_common(6))
    print(f"\nOne batch-1 decode step: {len(ops)} graph ops ({common}, ...)")


def main() -> None:
    """Print the four tables (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--skip-model", action="store_true", help="tables 1 and 2 only")
    args = parser.parse_args()
    if not backend.fast_math_in_use():
        raise SystemExit("fastmath is unavailable here (CPU backend with a C++ compiler needed)")
    elementwise(args.rounds)
    prefill_attention(args.rounds)
    if not args.skip_model:
        ensure_checkpoint(args.model)
        end_to_end(args.model, args.rounds)
        count_ops(args.model)


if __name__ == "__main__":
    main()
