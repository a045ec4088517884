"""What the paged cache adds to a decode step: building the views, writing, reading.

A decode step through ``models/cache`` does three things a contiguous per-row cache did not:
``StepCache(store, ids, 1)`` builds write indices, block tables and the mask on the host
(NumPy, then ``mx.array``); every layer scatters its new keys and values into the pool
(``CacheStore.write``); every layer's attention reads each row's keys and values out of the
pool: in place through the block tables (``PagedKV``, on the CPU backend), or gathered into
fresh ``[B, K, S, D]`` arrays first (``CacheStore.read_heads``, as every pass did before
the paged attention). This times, on the bench model at batch B and context ~300
(``step_profile.decode_step``'s rows), interleaved rounds, medians:

* ``full``: the engine's decode step (the pool read in place where the backend can);
* ``gathered``: the same step with attention reading a gathered copy instead;
* ``contiguous``: the same step with every layer's ``update_and_fetch`` returning
  keys and values already laid out ``[B, K, S, D]`` and evaluated (gathered once, before
  timing): what attention costs reading a contiguous cache; the difference from ``full`` is
  the scatter and gather (and any copy they force on the matmuls);
* ``write only`` / ``gather only``: the scatter alone (returning the contiguous arrays),
  the gather alone (reading the pool without writing this step's keys);
* ``views``: building ``StepCache`` alone, no model;
* ``gather``: one layer's gather of keys and values alone (``read_heads``), evaluated;
  times the number of layers gives the step's share.

It patches ``LayerView.update_and_fetch`` and ``update_and_page`` for the variants and
restores them; it knows
``CacheStore.write`` / ``read_heads`` and ``StepCache.groups``, not how they index the pools.
(Its first version, run on commit 57ff21f, gathered ``pool[gather]`` and transposed, as the
views did then; bench/RESULTS.md section 10 has both.)

Usage: python -m bench.cache_views [--batch 1 16] [--rounds 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from bench.step_profile import prefilled_store
from moeserve.models.cache import LayerView, StepCache
from moeserve.models.loader import load_model

_UPDATE = LayerView.update_and_fetch
_PAGE = LayerView.update_and_page


def _timed(fn: Callable[[], object], steps: int) -> float:
    fn()  # warm up this variant's shapes
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1000


def profile(model, rows: int, rounds: int, steps: int = 10) -> dict[str, float]:
    """Median ms of each variant at batch ``rows``.

    Args:
        model: The bench model.
        rows: Batch size.
        rounds: Interleaved rounds.
        steps: Calls timed per variant and round.

    Returns:
        Variant name -> ms.
    """
    store, ids = prefilled_store(model, [300 - 3 * r for r in range(rows)])
    tokens = mx.zeros((rows, 1), dtype=mx.int32)

    def rewind() -> None:
        for seq_id in ids:
            store.rows[seq_id].length -= 1

    # Each layer's keys and values as attention reads them, gathered once and kept.
    probe = StepCache(store, ids, 1).groups[0]
    layers = {i: store.read_heads(i, probe) for i in store.pools[0].arrays}
    mx.eval(layers)
    rewind()

    def contiguous_update(self: LayerView, *tensors: mx.array) -> tuple[mx.array, ...]:
        return tuple(layers[self.layer])

    current: list[StepCache] = []  # the pass being run (its group's indices)

    def write_only(self: LayerView, *tensors: mx.array) -> tuple[mx.array, ...]:
        flat = [t.transpose(0, 2, 1, 3).reshape(-1, t.shape[1], t.shape[3]) for t in tensors]
        group = current[-1].groups[0]
        store.write(self.layer, [group.write_rows(t.shape[1]) for t in flat], flat)
        return tuple(layers[self.layer])

    def gather_only(self: LayerView, *tensors: mx.array) -> tuple[mx.array, ...]:
        return tuple(store.read_heads(self.layer, current[-1].groups[0]))

    def step() -> None:
        current[:] = [StepCache(store, ids, 1)]
        mx.eval(mx.argmax(model(tokens, cache=current[0])[:, -1, :], axis=-1))
        rewind()

    def patched(update: Callable, page: Callable | None = None) -> Callable[[], None]:
        def run() -> None:
            LayerView.update_and_fetch = update
            LayerView.update_and_page = page or update
            try:
                step()
            finally:
                LayerView.update_and_fetch = _UPDATE
                LayerView.update_and_page = _PAGE

        return run

    def views() -> None:
        StepCache(store, ids, 1)
        rewind()

    first = next(iter(store.pools[0].arrays))

    def gather_one_layer() -> None:
        mx.eval(store.read_heads(first, probe))

    variants = {
        "full": step,
        "gathered": patched(_UPDATE, lambda self, k, v: self.update_and_fetch(k, v)),
        "contiguous": patched(contiguous_update),
        "write only": patched(write_only),
        "gather only": patched(gather_only),
        "views": views,
        "gather": gather_one_layer,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(_timed(fn, steps))
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
    n_layers = len(model.layers)
    for rows in args.batch:
        ms = profile(model, rows, args.rounds)
        full = ms["full"]
        print(f"\nDecode step, batch {rows}, context ~300: {full:.1f} ms\n")
        print("| part | ms | share of the step |\n|---|---|---|")
        parts = {
            "step reading a gathered copy": ms["gathered"],
            "scatter + read in place (full - contiguous)": full - ms["contiguous"],
            "scatter + gather (gathered - contiguous)": ms["gathered"] - ms["contiguous"],
            "scatter (write only - contiguous)": ms["write only"] - ms["contiguous"],
            "gather, as attention reads it (gather only - contiguous)": ms["gather only"]
            - ms["contiguous"],
            "building StepCache (host)": ms["views"],
            f"gathers alone (1 layer x {n_layers})": ms["gather"] * n_layers,
            "step on a contiguous cache": ms["contiguous"],
        }
        for name, value in parts.items():
            print(f"| {name} | {value:.2f} | {value / full:.0%} |")


if __name__ == "__main__":
    main()
