"""Stream stutter at C=16: the time-limited prefill against the token budget alone, in process.

Two engines share one loaded model: ``prefill_step_ratio`` 0 (the token budget alone, the
scheduler before issue 18) and the ratio under test (default 2). They take turns (A B B A
...) running the same closed-loop load: ``--concurrency`` clients, each sending its next
request when the last one ends, ``--requests`` in all, ~``--prompt-tokens`` prompts of
random words (each request its own, so nothing is reused), ``--output-tokens`` greedy tokens
each (``ignore_eos``). Each engine keeps its step cost model across its runs, as a server
would; a warm-up run per engine comes first and is not reported.

Reported per run and as medians: output tok/s, TTFT p50/p99 (submit to first token) and
ITL p50/p99 (gaps between a stream's successive tokens), all in this process, without HTTP:
what the scheduler decides, not the transport. The machine is shared: compare the two
columns of one session, not sessions.

Usage: python -m bench.prefill_budget [--ratio 2] [--runs 3] [--concurrency 16]
       [--requests 32] [--prompt-tokens 200] [--output-tokens 64] [--warmup-requests 16]
       [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from pathlib import Path

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from moeserve.models import load
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import DeltaEvent, GenerationRequest
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.text.tokenizer import Tokenizer

WORDS = "router expert token layer cache prefill decode batch stream budget shard gate".split()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def _load(engine: Engine, prompts: list[list[int]], concurrency: int, out: int) -> dict:
    """Closed-loop load; returns tok/s and the TTFT / ITL lists (ms)."""
    queue = list(prompts)
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
            start = last = time.perf_counter()
            first = True
            async for event in engine.generate(GenerationRequest(uuid.uuid4().hex, prompt, params)):
                if isinstance(event, DeltaEvent) and event.token_ids:
                    now = time.perf_counter()
                    (ttft if first else itl).append((now - (start if first else last)) * 1e3)
                    first, last = False, now
                    tokens += len(event.token_ids)

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return {"tok_s": tokens / (time.perf_counter() - start), "ttft": ttft, "itl": itl}


def main() -> None:
    """Run the alternating loads and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--warmup-requests", type=int, default=16)
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    ensure_checkpoint(args.model)
    loaded = load(args.model, "float32")
    tokenizer = Tokenizer.from_dir(loaded.path)
    rng = random.Random(0)

    def prompts(n: int) -> list[list[int]]:
        return [
            tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(args.prompt_tokens)))[
                : args.prompt_tokens
            ]
            for _ in range(n)
        ]

    engines = {
        "ratio 0 (tokens)": Engine(loaded.model, tokenizer, SchedulerConfig(prefill_step_ratio=0)),
        f"ratio {args.ratio:g}": Engine(
            loaded.model, tokenizer, SchedulerConfig(prefill_step_ratio=args.ratio)
        ),
    }
    for engine in engines.values():
        engine.start()
    results: dict[str, list[dict]] = {name: [] for name in engines}
    try:
        for engine in engines.values():  # warm-up: compilation, and the cost model learns
            warm = args.warmup_requests
            asyncio.run(_load(engine, prompts(warm), min(warm, args.concurrency), 16))
        names = list(engines)
        for k in range(args.runs):
            for name in names if k % 2 == 0 else names[::-1]:
                load_ = prompts(args.requests)
                r = asyncio.run(_load(engines[name], load_, args.concurrency, args.output_tokens))
                results[name].append(r)
                print(
                    f"run {k} {name}: {r['tok_s']:.1f} tok/s, TTFT p50 {_pct(r['ttft'], 0.5):.0f}"
                    f" ms, ITL p50 {_pct(r['itl'], 0.5):.1f} p99 {_pct(r['itl'], 0.99):.1f} ms",
                    flush=True,
                )
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(f"\nC={args.concurrency}, {args.requests} requests, ~{args.prompt_tokens} prompt tokens")
    print("| policy | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | p99/p50 |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        med = {
            key: statistics.median(f(r) for r in runs)
            for key, f in {
                "tok": lambda r: r["tok_s"],
                "t50": lambda r: _pct(r["ttft"], 0.5),
                "t99": lambda r: _pct(r["ttft"], 0.99),
                "i50": lambda r: _pct(r["itl"], 0.5),
                "i99": lambda r: _pct(r["itl"], 0.99),
            }.items()
        }
        print(
            f"| {name} | {med['tok']:.1f} | {med['t50']:.0f} | {med['t99']:.0f} | "
            f"{med['i50']:.1f} | {med['i99']:.1f} | {med['i99'] / med['i50']:.2f} |"
        )


if __name__ == "__main__":
    main()
