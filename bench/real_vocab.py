"""Sampling and grammar costs at a real vocabulary (151,936 logits), against a decode step.

On the real-vocabulary bench checkpoint (``bench/real_vocab_checkpoint.py``: Qwen3-30B-A3B's
per-layer shapes, 2 layers, weights loaded as float32), with B rows (default 16) prefilled to
~``--context`` tokens in the engine's paged ``CacheStore``, this times, interleaved (each
variant once per round; the median of the rounds, since the machine is shared):

* ``step greedy``: one decode step as the engine's runner does it (``StepCache`` views, the
  model, logits ``[B, V]``) and the engine's own ``Sampler`` at temperature 0, brought to
  the host (``SampleOutput.to_lists``);
* ``step top_p``: the same step sampling every row at temperature 1, ``top_p`` 0.9, no top_k;
* ``sample top_p`` / ``sample greedy``: the ``Sampler`` alone on logits already computed;
* ``step json``: a grammar-constrained step, as the runner does it: the model's graph is
  started (``mx.async_eval``), the batch's allowed mask is built by ``grammar_mask.allowed_mask``
  from each row's ``Matcher`` (``GrammarCompiler.json_schema`` of ``bench/constrained.py``'s
  schema, which cannot finish within the run), the ``Sampler`` takes it (greedy), and every
  row's matcher consumes its token;
* ``mask json``: ``allowed_mask`` alone, on matchers in the state the last step left.

The figures the issue sets targets for: the sampling cost of ``top_p`` 0.9 as a fraction of
a step, both as ``sample top_p / step top_p`` and as the marginal ``(step top_p - step
greedy) / step top_p``; and ``step json / step greedy`` (target <= 1.5x).

Each variant is timed in wall time and in this process's CPU time (all threads): on a machine
shared with other work the CPU figures are the steadier ones, and ratios of both are printed.

Because everything goes through ``server.engine.sampling`` and ``server.engine.grammar``, a
change there shows here. What it does not cover: the engine loop (scheduling, detokenising,
HTTP), prefill, and the other layers of the real 48-layer model, whose decode step is ~24
times longer in its layers (so these fractions overstate the real model's).

Usage: python -m bench.real_vocab [--model DIR] [--batch 16] [--context 128] [--rounds 5]
       [--json OUT]
       python -m bench.real_vocab --sampler-only   (no model: the sampler on flat and peaked
           logits; the random model's are flat, so its top_p nucleus is most of the vocabulary)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from bench.constrained import SCHEMA
from bench.real_vocab_checkpoint import DEFAULT_REAL_VOCAB_DIR, ensure_real_vocab_checkpoint
from moeserve.models.cache import CacheStore, StepCache
from moeserve.models.loader import load
from moeserve.server.engine.grammar import GrammarCompiler, Matcher
from moeserve.server.engine.grammar_mask import allowed_mask
from moeserve.server.engine.sampling import Sampler, SamplerRow, SamplingParams
from moeserve.server.text.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)
TOP_P = SamplingParams(temperature=1.0, top_p=0.9, top_k=0)


class Bench:
    """B rows prefilled in one store, the engine's sampler, and one matcher per row."""

    def __init__(self, model_dir: Path, batch: int, context: int) -> None:
        loaded = load(model_dir, dtype="float32")
        self.model, self.batch = loaded.model, batch
        self.vocab = loaded.config["vocab_size"]
        self.tokenizer = Tokenizer.from_dir(loaded.path)
        self.store = CacheStore(self.model.cache_layout(), self.model.cache_dtype())
        self.ids = [f"row{r}" for r in range(batch)]
        prompt = mx.random.randint(0, 150_000, (1, context), key=mx.random.key(0))
        for r, seq_id in enumerate(self.ids):  # slightly different lengths, as real rows
            n = context - 3 * r
            self.store.add(seq_id)
            cache = StepCache(self.store, [seq_id], n)
            mx.eval(self.model(prompt[:, :n], cache=cache, last_only=True), cache.arrays())
        self.sampler = Sampler()
        self.tokens = mx.zeros((batch, 1), dtype=mx.int32)
        self.grammar = GrammarCompiler(self.tokenizer)
        self.constraint = self.grammar.json_schema(SCHEMA)
        self.matchers: list[Matcher] = []
        self.reset_matchers()
        self.logits = self.forward()
        mx.eval(self.logits)

    def reset_matchers(self) -> None:
        """Fresh matchers at the start of the schema."""
        self.matchers = [self.grammar.matcher(self.constraint) for _ in self.ids]

    def forward(self) -> mx.array:
        """One decode step's logits ``[B, V]`` (lazy); the rows' lengths stay fixed."""
        logits = self.model(self.tokens, cache=StepCache(self.store, self.ids, 1))[:, -1, :]
        for seq_id in self.ids:  # the step wrote one position; the next one overwrites it
            self.store.rows[seq_id].length -= 1
        return logits

    def rows(self, params: SamplingParams) -> list[SamplerRow]:
        """One sampler row per batch row."""
        return [SamplerRow(params) for _ in self.ids]

    def step(self, params: SamplingParams) -> list[int]:
        """A full unconstrained step: forward, sample, to the host."""
        rows = self.rows(params)
        return [s.token for s in self.sampler(self.forward(), rows).to_lists(rows)]

    def sample(self, params: SamplingParams) -> list[int]:
        """The sampler alone on the stored logits."""
        rows = self.rows(params)
        return [s.token for s in self.sampler(self.logits, rows).to_lists(rows)]

    def step_json(self) -> list[int]:
        """A constrained step as the runner does it: the graph runs while masks are built."""
        logits = self.forward()
        mx.async_eval(logits)
        mask = allowed_mask(self.matchers, self.vocab)
        rows = self.rows(GREEDY)
        tokens = [s.token for s in self.sampler(logits, rows, mask).to_lists(rows)]
        for matcher, token in zip(self.matchers, tokens, strict=True):
            matcher.consume(token)
        if any(m.error is not None or m.is_done for m in self.matchers):
            self.reset_matchers()  # keep every row constrained (noted in the output)
            self.resets += 1
        return tokens

    resets = 0

    def mask_json(self) -> None:
        """The batch's allowed mask alone, evaluated."""
        mx.eval(allowed_mask(self.matchers, self.vocab))


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU ms per call of each variant, round-robin after one untimed call each.

    CPU time is this process's, all threads (``time.process_time``): on a machine shared with
    other work it moves much less than wall time, since waiting for a core is not counted.

    Args:
        variants: Name -> the call.
        rounds: Timed calls of each.

    Returns:
        (name -> median wall ms, name -> median CPU ms).
    """
    for fn in variants.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - start) * 1000)
            cpu[name].append((time.process_time() - start_cpu) * 1000)
    median = statistics.median
    return {k: median(v) for k, v in wall.items()}, {k: median(v) for k, v in cpu.items()}


def _ratios(ms: dict[str, float]) -> dict[str, float]:
    return {
        "sample top_p / step top_p": ms["sample top_p"] / ms["step top_p"],
        "(step top_p - step greedy) / step top_p": (ms["step top_p"] - ms["step greedy"])
        / ms["step top_p"],
        "step json / step greedy": ms["step json"] / ms["step greedy"],
        "mask json / step greedy": ms["mask json"] / ms["step greedy"],
    }


def run(model_dir: Path, batch: int, context: int, rounds: int) -> dict[str, Any]:
    """Time every variant and derive the ratios.

    Args:
        model_dir: The real-vocabulary checkpoint.
        batch: Rows.
        context: Tokens each row holds (row r: ``context - 3 r``).
        rounds: Timed rounds.

    Returns:
        ``{"ms": {...}, "cpu_ms": {...}, "ratios": {...}, "cpu_ratios": {...}, ...}``.
    """
    bench = Bench(model_dir, batch, context)
    ms, cpu_ms = interleaved(
        {
            "step greedy": lambda: bench.step(GREEDY),
            "step top_p": lambda: bench.step(TOP_P),
            "sample greedy": lambda: bench.sample(GREEDY),
            "sample top_p": lambda: bench.sample(TOP_P),
            "step json": bench.step_json,
            "mask json": bench.mask_json,
        },
        rounds,
    )
    return {
        "model": str(model_dir),
        "vocab": bench.vocab,
        "tokenizer_entries": bench.tokenizer.vocab_size,
        "batch": batch,
        "context": context,
        "rounds": rounds,
        "matcher_resets": bench.resets,
        "ms": ms,
        "cpu_ms": cpu_ms,
        "ratios": _ratios(ms),
        "cpu_ratios": _ratios(cpu_ms),
    }


def sampler_only(batch: int, rounds: int, vocab: int = 151_936) -> dict[str, Any]:
    """The sampler alone on seeded logits, flat and peaked, without the model.

    The random-weight checkpoint's logits are nearly flat (about N(0, 1) over 151,936 ids),
    so its ``top_p`` 0.9 nucleus holds most of the vocabulary, which no trained model's does.
    Scaling the same logits by 8 gives a peaked distribution with a nucleus of a few hundred
    tokens at most; both are timed, with the nucleus size of row 0.

    Args:
        batch: Rows.
        rounds: Timed rounds.
        vocab: Logits per row.

    Returns:
        ``{"ms", "cpu_ms", "nucleus"}`` by variant.
    """
    sampler = Sampler()
    flat = mx.random.normal((batch, vocab), key=mx.random.key(1))
    peaked = flat * 8
    mx.eval(flat, peaked)

    def sample(logits: mx.array, params: SamplingParams) -> list[int]:
        rows = [SamplerRow(params) for _ in range(batch)]
        return [x.token for x in sampler(logits, rows).to_lists(rows)]

    def nucleus(logits: mx.array) -> int:
        p = mx.sort(mx.softmax(logits[0]))[::-1]
        return int(mx.sum(mx.cumsum(p) < TOP_P.top_p).item()) + 1

    ms, cpu_ms = interleaved(
        {
            "flat greedy": lambda: sample(flat, GREEDY),
            "flat top_p": lambda: sample(flat, TOP_P),
            "peaked greedy": lambda: sample(peaked, GREEDY),
            "peaked top_p": lambda: sample(peaked, TOP_P),
        },
        rounds,
    )
    return {
        "ms": ms,
        "cpu_ms": cpu_ms,
        "nucleus": {"flat": nucleus(flat), "peaked": nucleus(peaked)},
    }


def main() -> None:
    """Build the checkpoint if missing, run, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_REAL_VOCAB_DIR)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    p.add_argument("--sampler-only", action="store_true", help="no model: flat vs peaked logits")
    args = p.parse_args()
    if args.sampler_only:
        out = sampler_only(args.batch, args.rounds)
        print(f"sampler alone, batch {args.batch}, 151,936 logits, nucleus {out['nucleus']}")
        for name, value in out["ms"].items():
            print(f"{name:>14} {value:9.1f} ms wall {out['cpu_ms'][name]:9.1f} ms CPU")
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return
    if args.model == DEFAULT_REAL_VOCAB_DIR:
        ensure_real_vocab_checkpoint(args.model)
    out = run(args.model, args.batch, args.context, args.rounds)
    print(
        f"vocab {out['vocab']} (tokenizer {out['tokenizer_entries']}), batch {out['batch']}, "
        f"context ~{out['context']}, median of {out['rounds']} rounds"
    )
    print(f"{'':>16} {'wall ms':>9} {'CPU ms':>9}")
    for name, value in out["ms"].items():
        print(f"{name:>16} {value:9.1f} {out['cpu_ms'][name]:9.1f}")
    print(f"{'':>40} {'wall':>6} {'CPU':>6}")
    for name, value in out["ratios"].items():
        print(f"{name:>40} {value:6.3f} {out['cpu_ratios'][name]:6.3f}")
    if out["matcher_resets"]:
        print(f"note: matchers restarted {out['matcher_resets']} times (finished or failed)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
