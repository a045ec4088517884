"""Aggregate decode throughput of the engine (no HTTP) at several concurrencies.

Runs C requests at once, each with a short prompt and a fixed number of output tokens
(``ignore_eos``), and reports output tokens per second over the whole run, per concurrency,
plus the ratio to concurrency 1. This isolates the engine and kernels from HTTP overhead.

Usage: python bench/decode_scaling.py [--model DIR] [-c 1 4 16] [--tokens 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from moeserve.models import load
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import FinishEvent, GenerationRequest
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.text.tokenizer import Tokenizer


async def _one(engine: Engine, prompt: list[int], tokens: int) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    done = 0
    async for event in engine.generate(GenerationRequest(uuid.uuid4().hex, prompt, params)):
        if isinstance(event, FinishEvent):
            done = event.completion_tokens
    return done


def measure(engine: Engine, tokenizer: Tokenizer, concurrency: int, tokens: int) -> dict:
    """Run ``concurrency`` requests at once and time them.

    Args:
        engine: A started engine.
        tokenizer: Its tokenizer.
        concurrency: Simultaneous requests.
        tokens: Output tokens per request.

    Returns:
        A result row.
    """
    prompts = [
        tokenizer.encode(f"Request {i}: the scheduler decides who runs in the next step.")
        for i in range(concurrency)
    ]

    async def run() -> list[int]:
        return await asyncio.gather(*[_one(engine, p, tokens) for p in prompts])

    asyncio.run(_one(engine, prompts[0], 4))  # warm-up (kernel compilation, allocations)
    start = time.perf_counter()
    produced = sum(asyncio.run(run()))
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "output_tokens": produced,
        "seconds": round(elapsed, 3),
        "output_tokens_per_s": round(produced / elapsed, 1),
    }


def main() -> None:
    """Parse arguments, run every concurrency, print a table and optional JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ensure_checkpoint(args.model)
    loaded = load(args.model)
    tokenizer = Tokenizer.from_dir(loaded.path)
    engine = Engine(loaded.model, tokenizer, SchedulerConfig(max_running=64, max_model_len=8192))
    engine.start()
    try:
        rows = [measure(engine, tokenizer, c, args.tokens) for c in args.concurrency]
    finally:
        engine.shutdown()
    base = rows[0]["output_tokens_per_s"]
    print(f"{'concurrency':>11} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs c=1':>7}")
    for row in rows:
        row["ratio_vs_first"] = round(row["output_tokens_per_s"] / base, 2)
        print(
            f"{row['concurrency']:>11} {row['output_tokens']:>7} {row['seconds']:>8} "
            f"{row['output_tokens_per_s']:>8} {row['ratio_vs_first']:>6}x"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
