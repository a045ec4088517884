"""One-row float32 products: OpenBLAS's sgemm against its sgemv, and the model with the shim.

MLX's CPU backend does every float32 product with ``cblas_sgemm``, including the one-row ones
of decoding; ``models/backend/gemv_forward.c`` sends those to ``cblas_sgemv`` (see
``models/backend/blas.py``). Two tables:

1. the BLAS alone (called through ctypes on NumPy buffers, so MLX plays no part): a 1-row
   product with ``cblas_sgemm`` and the same product with ``cblas_sgemv``, for the bench
   model's weight shapes; 8 distinct weights per call so that they come from memory;
2. the bench checkpoint: one decode step at batch 1 and 16 (context ~300), with the shim on
   and off. The shim is chosen before MLX loads, so each variant runs in a fresh process
   (``MOESERVE_BLAS_GEMV``); rounds alternate the variants, and the median is reported.

Usage: python -m bench.gemv [--rounds 3] [--model DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from bench.step_profile import decode_step
from bench.timing import median_seconds
from moeserve.models.backend.blas import blas_path, gemv_forwarding
from moeserve.models.loader import load_model

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _median_us(fn: Callable[[], object], repeat: int = 100) -> float:
    return median_seconds(fn, repeat, warmup=5) * 1e6


def blas_table() -> None:
    """Table 1."""
    path = blas_path()
    if path is None:
        print("no optimized BLAS loaded: table 1 skipped")
        return
    lib = ctypes.CDLL(path)
    if not hasattr(lib, "cblas_sgemv"):
        print(f"{path} has no cblas_sgemv: table 1 skipped")
        return
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    sgemm, sgemv = lib.cblas_sgemm, lib.cblas_sgemv
    sgemm.argtypes = [i32] * 6 + [f32, ptr, i32, ptr, i32, f32, ptr, i32]
    sgemv.argtypes = [i32] * 4 + [f32, ptr, i32, ptr, i32, f32, ptr, i32]
    rng = np.random.default_rng(0)
    print(f"\nBLAS: {path}\n")
    print("| weight [out, in] | sgemm, 1 row | GB/s | sgemv | GB/s | speed-up |")
    print("|---|---|---|---|---|---|")
    # q/o and shared-expert projections; k/v and one expert's gate/up; two wider products
    # of the same widths; the output head.
    for out, inp in [(512, 512), (256, 512), (256, 512 * 4), (512, 256 * 4), (4096, 512)]:
        weights = [rng.standard_normal((out, inp), dtype=np.float32) for _ in range(8)]
        x = rng.standard_normal(inp, dtype=np.float32)
        y = np.zeros(out, dtype=np.float32)

        def gemm(weights: list[np.ndarray] = weights, x=x, y=y, out=out, inp=inp) -> None:
            for w in weights:  # y[1, out] = x[1, in] @ w.T, as MLX asks for it
                sgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, 1, out, inp, 1.0,
                      x.ctypes.data, inp, w.ctypes.data, inp, 0.0, y.ctypes.data, out)  # fmt: skip

        def gemv(weights: list[np.ndarray] = weights, x=x, y=y, out=out, inp=inp) -> None:
            for w in weights:  # y = w @ x
                sgemv(_ROW_MAJOR, _NO_TRANS, out, inp, 1.0,
                      w.ctypes.data, inp, x.ctypes.data, 1, 0.0, y.ctypes.data, 1)  # fmt: skip

        gb = 8 * out * inp * 4 / 1e9
        a, b = _median_us(gemm), _median_us(gemv)
        print(
            f"| {out} x {inp} | {a:.0f} µs | {gb / a * 1e6:.1f} | {b:.0f} µs | "
            f"{gb / b * 1e6:.1f} | {a / b:.2f}x |"
        )


def _step_worker(model_dir: Path, rows: int) -> None:
    """Print the median decode-step time (ms) at batch ``rows``, as JSON, for table 2."""
    model, _ = load_model(model_dir, "float32")
    step = decode_step(model, rows)
    ms = _median_us(step, repeat=40) / 1000
    print(json.dumps({"ms": ms, "shim": gemv_forwarding()}))


def model_table(model_dir: Path, rounds: int) -> None:
    """Table 2."""
    runs: dict[tuple[int, bool], list[float]] = {}
    for _ in range(rounds):
        for rows in (1, 16):
            for shim in (False, True):
                env = {**os.environ, "MOESERVE_BLAS_GEMV": "1" if shim else "0"}
                command = [sys.executable, "-m", "bench.gemv", "--step-worker", str(rows)]
                command += ["--model", str(model_dir)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                report = json.loads(done.stdout.strip().splitlines()[-1])
                if report["shim"] != shim:
                    raise SystemExit(f"the shim could not be turned {'on' if shim else 'off'}")
                runs.setdefault((rows, shim), []).append(report["ms"])
    print("\n| bench model | shim off ms | shim on ms | speed-up |\n|---|---|---|---|")
    for rows in (1, 16):
        off = statistics.median(runs[(rows, False)])
        on = statistics.median(runs[(rows, True)])
        print(f"| decode step, batch {rows} | {off:.1f} | {on:.1f} | {off / on:.2f}x |")


def main() -> None:
    """Print the two tables (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--step-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step_worker is not None:
        _step_worker(args.model, args.step_worker)
        return
    blas_table()
    ensure_checkpoint(args.model)
    model_table(args.model, args.rounds)


if __name__ == "__main__":
    main()
