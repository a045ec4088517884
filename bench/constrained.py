"""Cost of grammar-constrained decoding: a batch of JSON-schema requests vs a free batch.

Runs B requests at once (engine level, no HTTP) twice: constrained by a JSON schema, then
unconstrained with ``ignore_eos``. The schema asks for an array with at least 100 items, so
no constrained row can finish before ``max_tokens`` and both runs decode the same B rows for
the same number of steps; the figure compared is wall time per generated token, and the
ratio constrained / free is the overhead of the grammar masks (target: at most 1.5x).

Usage: python -m bench.constrained [--model DIR] [--batch 8] [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from moeserve.models import load
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import ErrorEvent, FinishEvent, GenerationRequest
from moeserve.server.engine.grammar import Constraint
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.text.tokenizer import Tokenizer

ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["expert", "router", "token"]},
    },
    "required": ["id", "name", "kind"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": ITEM, "minItems": 100}},
    "required": ["items"],
    "additionalProperties": False,
}


async def _one(engine: Engine, request: GenerationRequest) -> int:
    produced = 0
    async for event in engine.generate(request):
        if isinstance(event, ErrorEvent):
            raise RuntimeError(event.message)
        if isinstance(event, FinishEvent):
            produced = event.completion_tokens
    return produced


def run_batch(
    engine: Engine, prompt: list[int], batch: int, tokens: int, constraint: Constraint | None
) -> tuple[int, float]:
    """Run ``batch`` requests at once.

    Args:
        engine: A started engine.
        prompt: The prompt of every request.
        batch: Simultaneous requests.
        tokens: ``max_tokens`` of each.
        constraint: The grammar, or None for free generation (then with ``ignore_eos``).

    Returns:
        Generated tokens and elapsed seconds.
    """
    requests = [
        GenerationRequest(
            uuid.uuid4().hex,
            prompt,
            SamplingParams(
                temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=constraint is None
            ),
            constraint=constraint,
        )
        for i in range(batch)
    ]

    async def together() -> list[int]:
        return await asyncio.gather(*[_one(engine, r) for r in requests])

    start = time.perf_counter()
    produced = sum(asyncio.run(together()))
    return produced, time.perf_counter() - start


def main() -> None:
    """Parse arguments, time both batches (best of ``--repeats``), print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ensure_checkpoint(args.model)
    loaded = load(args.model)
    tokenizer = Tokenizer.from_dir(loaded.path)
    engine = Engine(loaded.model, tokenizer, SchedulerConfig(max_running=64, max_model_len=8192))
    engine.start()
    prompt = tokenizer.encode("List the experts of the model as JSON records, one per line.")
    try:
        constraint = engine.grammar.json_schema(SCHEMA)
        run_batch(engine, prompt, args.batch, 8, constraint)  # warm-up both paths
        run_batch(engine, prompt, args.batch, 8, None)
        best = {}
        for name, c in (("free", None), ("constrained", constraint)):
            runs = [
                run_batch(engine, prompt, args.batch, args.tokens, c) for _ in range(args.repeats)
            ]
            best[name] = min((s / n, n, s) for n, s in runs)
    finally:
        engine.shutdown()
    print(f"batch {args.batch}, {args.tokens} tokens each, best of {args.repeats}")
    print(f"{'run':>12} {'tokens':>7} {'seconds':>8} {'ms/token':>9}")
    for name, (per_token, n, seconds) in best.items():
        print(f"{name:>12} {n:>7} {seconds:>8.3f} {per_token * 1000:>9.3f}")
    ratio = best["constrained"][0] / best["free"][0]
    print(f"constrained / free time per token: {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
