"""Which OpenBLAS to put under MLX: the scipy-openblas32 wheel against the system library.

Each variant is a ``MOESERVE_BLAS`` / ``MOESERVE_BLAS_GEMV`` setting, chosen before MLX
loads, so each measurement runs in a fresh process; rounds alternate the variants and the
median over rounds is reported. A worker measures, on the bench checkpoint (float32):

* one decode step at batch 1 and at batch 16 (context ~300; ``bench.step_profile``);
* a 512-token prefill forward pass;
* a bare ``[512, 512] @ [512, 4096]`` float32 matmul (GFLOP/s), the shape of prefill's
  projections, and a one-row ``[1, 512] @ [512, 4096]`` product (GB/s of weights streamed).

This is the short comparison of bench/RESULTS.md, section 9, not bench/compare.py (~20 min).

Usage: python -m bench.blas_choice [--rounds 3] [--variants wheel,system,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from bench.timing import median_seconds

# name -> (MOESERVE_BLAS, MOESERVE_BLAS_GEMV)
VARIANTS = {
    "wheel": ("wheel", "1"),  # scipy-openblas32 through the shim, one-row rerouting on
    "wheel-nogemv": ("wheel", "0"),  # the shim only forwards: OpenBLAS 0.3.34's own sgemm path
    "system": ("system", "1"),  # the system OpenBLAS plus the shim: the old fast path
    "system-nogemv": ("system", "0"),
    "none": ("none", "1"),  # MLX's bundled reference BLAS
}
FIGURES = ("decode_b1_ms", "decode_b16_ms", "prefill512_ms", "sgemm_gflops", "row_gbs")


def _median_3(fn: Callable[[], object], repeat: int) -> float:
    return median_seconds(fn, repeat, warmup=3)


def _worker(model_dir: Path, quick: bool) -> None:
    """Print this process's figures as one JSON line."""
    import mlx.core as mx

    from bench.step_profile import decode_step
    from moeserve.models.backend.blas import blas_in_use
    from moeserve.models.loader import load_model

    out: dict[str, object] = {"blas": blas_in_use()}
    key = mx.random.key(0)
    a, w = mx.random.normal((512, 512), key=key), mx.random.normal((512, 4096), key=key)
    x = mx.random.normal((1, 512), key=key)
    ws = [mx.random.normal((512, 4096), key=mx.random.key(i)) for i in range(8)]
    mx.eval(a, w, x, *ws)
    seconds = _median_3(lambda: mx.eval(a @ w), 10 if quick else 20)
    out["sgemm_gflops"] = 2 * 512 * 512 * 4096 / seconds / 1e9
    seconds = _median_3(lambda: mx.eval([x @ m for m in ws]), 20)  # 8 weights: from memory
    out["row_gbs"] = 8 * 512 * 4096 * 4 / seconds / 1e9
    if not quick:
        model, _ = load_model(model_dir, "float32")
        for rows in (1, 16):
            out[f"decode_b{rows}_ms"] = _median_3(decode_step(model, rows), 30) * 1000
        prompt = mx.random.randint(0, 4000, (1, 512), key=key)

        def prefill() -> None:
            mx.eval(model(prompt, cache=model.make_cache()))

        out["prefill512_ms"] = _median_3(prefill, 5) * 1000
    print(json.dumps(out))


def main() -> None:
    """Print one markdown table of medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="wheel,wheel-nogemv,system,system-nogemv")
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="matmuls only, no model")
    args = parser.parse_args()
    if args.worker:
        _worker(args.model, args.quick)
        return
    if not args.quick:
        ensure_checkpoint(args.model)
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            blas, gemv = VARIANTS[name]
            env = {**os.environ, "MOESERVE_BLAS": blas, "MOESERVE_BLAS_GEMV": gemv}
            env.pop("LD_PRELOAD", None)
            command = [sys.executable, "-m", "bench.blas_choice", "--worker"]
            command += ["--model", str(args.model)] + (["--quick"] if args.quick else [])
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    shown = [f for f in FIGURES if f in runs[names[0]][0]]
    print("| variant | BLAS | " + " | ".join(shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for name in names:
        cells = [f"{statistics.median(r[f] for r in runs[name]):.1f}" for f in shown]
        print(f"| {name} | {runs[name][0]['blas']} | " + " | ".join(cells) + " |")
    print(f"\n{args.rounds} rounds, medians; every figure per round: {json.dumps(runs)}")


if __name__ == "__main__":
    main()
