"""What the sampler costs at a real vocabulary (151,936 tokens, Qwen3's), by parameter mix.

Times ``Sampler()(logits, rows)`` plus ``to_lists`` (the host conversion the runner does) on
synthetic logits ``[B, V]``, for each mix of parameters below, and prints one line each:
the default sampler (partial selection, ``server.engine.truncation``), the same sampler forced
to sort whole rows (``candidates = V``: the full-sort reference), and optionally the sampler
of another revision (``--old FILE``: a copy of an older ``server/engine/sampling.py``, e.g.
``git show 843fa06:server/engine/sampling.py > /tmp/old_sampling.py``).

Logits are N(0, sigma) per token: ``--sigma 4`` puts the top_p 0.9 nucleus within a few
hundred tokens, as trained models usually do; ``--sigma 1`` is a near-flat row (an untrained
model) whose nucleus is most of the vocabulary, the case that needs the full sort.
The CPU is shared: compare columns of one run, not runs.

The same costs against a real decode step, on the real-vocabulary checkpoint, are
``bench/real_vocab.py``'s.

Usage: python -m bench.sampling_cost [--batch 16] [--vocab 151936] [--sigma 4] [--old FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import mlx.core as mx

from bench.timing import median_seconds
from moeserve.server.engine.sampling import Sampler, SamplerRow, SamplingParams

MIXES: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "temperature 0.8": {"temperature": 0.8},
    "top_p 0.9": {"top_p": 0.9},
    "top_p 0.9 seeded": {"top_p": 0.9, "seed": 1},
    "top_k 50 top_p 0.9": {"top_k": 50, "top_p": 0.9},
    "min_p 0.05": {"min_p": 0.05},
    "top_p 0.9 + logprobs": {"top_p": 0.9, "logprobs": True, "top_logprobs": 5},
}


def _load_old(path: Path):
    spec = importlib.util.spec_from_file_location("old_sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    """Print the median cost of each mix for each sampler."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--sigma", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--old", type=Path, help="an older sampling.py to time alongside")
    args = parser.parse_args()

    mx.random.seed(0)
    logits = mx.random.normal((args.batch, args.vocab)) * args.sigma
    mx.eval(logits)
    samplers = {"partial": (Sampler(), SamplerRow, SamplingParams)}
    samplers["full sort"] = (Sampler(candidates=args.vocab), SamplerRow, SamplingParams)
    if args.old:
        old = _load_old(args.old)
        samplers["old"] = (old.Sampler(), old.SamplerRow, old.SamplingParams)
    print(f"B={args.batch} V={args.vocab} sigma={args.sigma}; median ms of {args.repeats}")
    print(f"{'mix':24s}" + "".join(f"{name:>12s}" for name in samplers))
    for mix, params in MIXES.items():
        cells = []
        for sampler, row_type, params_type in samplers.values():
            rows = [row_type(params_type(**params)) for _ in range(args.batch)]

            def run(sampler=sampler, rows=rows) -> None:
                sampler(logits, rows).to_lists(rows)

            cells.append(median_seconds(run, args.repeats, warmup=1) * 1e3)
        print(f"{mix:24s}" + "".join(f"{c:12.1f}" for c in cells))


if __name__ == "__main__":
    main()
