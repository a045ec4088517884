"""Time the three ways routed experts can run on this backend, by number of tokens.

``gather`` (``mx.gather_mm``), ``dense`` (every expert on every token, keep the selected) and
``grouped`` (tokens sorted by expert, one contiguous matmul per expert) on the bench
checkpoint's expert shape (16 experts of 512 -> 256, top-4). The CPU backend
(``models/backend/experts.py``) picks between them with the crossover points this prints;
re-run it on new hardware.

Usage: python -m bench.moe_dispatch [--tokens 1 4 16 32 64 128 512] [--repeat 20]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from moeserve.models.backend import CpuBackend, experts
from moeserve.models.layers.moe import SwitchGLU


def _time(fn, *args, repeat: int) -> float:
    mx.eval(fn(*args))
    start = time.perf_counter()
    for _ in range(repeat):
        mx.eval(fn(*args))
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    """Print a table of milliseconds per call for each strategy and token count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 512])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    mx.random.seed(0)
    layer = SwitchGLU(512, 256, 16)
    mx.eval(layer.parameters())
    cpu = CpuBackend()
    projections = (layer.gate_proj, layer.up_proj, layer.down_proj)

    def run(strategy: str, x: mx.array, inds: mx.array) -> mx.array:
        return experts.STRATEGIES[strategy](x, inds, *projections, cpu.swiglu)

    print(f"{'tokens':>6} {'gather ms':>10} {'dense ms':>9} {'grouped ms':>11}  policy")
    for T in args.tokens:
        x = mx.random.normal((T, 512))
        inds = mx.argsort(mx.random.uniform(shape=(T, 16)), axis=-1)[:, :4].astype(mx.uint32)
        row = [
            _time(run, strategy, x, inds, repeat=args.repeat)
            for strategy in ("gather", "dense", "grouped")
        ]
        print(
            f"{T:>6} {row[0]:>10.2f} {row[1]:>9.2f} {row[2]:>11.2f}  "
            f"{cpu.expert_strategy(T, False, mx.float32)}"
        )


if __name__ == "__main__":
    main()
