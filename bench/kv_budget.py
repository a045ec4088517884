"""The KV byte budget under a mixed load: one long conversation and many short ones at once.

Runs the bench checkpoint with ``kv_cache_max_bytes`` set below what the load would hold
without a bound: one chat conversation of ``--long-tokens`` prompt tokens and ``--shorts``
single-message chats of ``--short-tokens``, all submitted at once, each generating
``--max-tokens`` tokens (greedy, ``ignore_eos``). Prompts are built with the checkpoint's own
tokenizer and chat template, so the token counts are real. The budget is
``--budget-fraction`` of the total demand: the sum, over requests, of the bytes one row of
prompt + max_tokens positions holds (``CacheLayout.row_bytes``, whole blocks).

Two ways to run it:

* in this process (default): an ``Engine`` with the prompt cache off, sampled after every
  step by a wrapper around ``Engine.step`` on the engine thread (``engine.stats()``:
  ``kv_cache_bytes``, the pools' allocated capacity, and ``kv_cache_tokens``, the positions
  rows hold; plus this process's ``VmRSS``);
* ``--serve``: a ``moeserve serve`` subprocess with ``--kv-cache-max-bytes``, concurrent
  HTTP streams, ``/metrics`` polled every ``--poll`` seconds (``bench/kv_budget_serve.py``).

It reports:

* requests completed, with the tokens they produced;
* peak allocated KV against the budget;
* the largest ratio allocated / (tokens held x bytes per token), over all samples and over
  those holding at least ``--steady-tokens`` positions (a row's last block and the pools'
  spare eighth weigh most when few tokens are held: the first chunk, the last rows);
* peak RSS growth of the process that runs the engine: ``VmHWM`` after the run less
  ``VmRSS`` when the high-water mark was reset (``/proc/PID/clear_refs``) after loading and a
  warm-up request, so model loading does not count; in process, MLX's own peak beside it;
* preemptions, wall time, output tokens per second.

It knows the engine's public surface (``Engine``, ``stats``, ``step``), the server's flags
and metrics, and Linux's ``/proc``; not the scheduler's or the store's internals.

Usage: python -m bench.kv_budget [--serve] [--budget-fraction 0.6] [--max-tokens 96]
       [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from bench.kv_budget_serve import proc_memory, reset_peak_rss, served
from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from moeserve.devtools.loadgen import build_prompt
from moeserve.models import load
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import FinishEvent, GenerationRequest
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.text.tokenizer import Tokenizer

MIB = 1 << 20
RSS_ALLOWANCE = 400 * 10**6  # what the process may grow beyond the budget (the target: 400 MB)
RATIO_LIMIT = 1.25  # allocated bytes per held token's bytes (the target)


def conversation(
    tokenizer: Tokenizer, target: int, turns: int, seed: int
) -> tuple[list[dict[str, str]], list[int]]:
    """A chat of ``turns`` messages (user first and last) near ``target`` prompt tokens.

    Each message is ``loadgen.build_prompt`` words; the word count per message is corrected
    by the measured tokens per word until the rendered prompt is within 1% or stops improving.

    Args:
        tokenizer: The checkpoint's tokenizer (its chat template renders the prompt).
        target: Prompt tokens wanted, template included.
        turns: Messages (odd: it ends with the user's).
        seed: Distinguishes prompts (no shared prefix beyond the template's header).

    Returns:
        The messages, and the prompt's token ids (what a server renders from them).
    """
    roles = ["user" if t % 2 == 0 else "assistant" for t in range(turns)]

    def render(words: int) -> tuple[list[dict[str, str]], list[int]]:
        messages = [
            {"role": role, "content": build_prompt(t, words, seed)} for t, role in enumerate(roles)
        ]
        return messages, tokenizer.tokenize_chat(messages)

    words = max(1, round(target / turns / 1.3))
    best = render(words)
    for _ in range(6):
        chat = render(words)
        n = len(chat[1])
        if abs(n - target) < abs(len(best[1]) - target):
            best = chat
        if abs(n - target) <= target // 100:
            break
        words = max(1, words + round((target - n) * words / n))
    return best


@dataclass
class Samples:
    """KV use and resident memory, one sample per engine step (or per ``/metrics`` poll)."""

    bytes_per_token: int
    kv_bytes: list[int] = field(default_factory=list)
    kv_tokens: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    def add(self, kv_bytes: int, kv_tokens: int, rss: int) -> None:
        """Record one sample.

        Args:
            kv_bytes: Allocated KV bytes (``kv_cache_bytes``).
            kv_tokens: Positions held (``kv_cache_tokens``).
            rss: Resident bytes of the process running the engine.
        """
        self.kv_bytes.append(kv_bytes)
        self.kv_tokens.append(kv_tokens)
        self.rss.append(rss)

    def max_ratio(self, min_tokens: int = 1) -> tuple[float, int, int]:
        """The largest allocated / (tokens x bytes per token) over samples holding enough.

        Args:
            min_tokens: Samples holding fewer positions are left out.

        Returns:
            ``(ratio, step, tokens held then)``; ``(0.0, -1, 0)`` when no sample qualifies.
        """
        best = (0.0, -1, 0)
        for step, (b, t) in enumerate(zip(self.kv_bytes, self.kv_tokens)):
            if t >= min_tokens and b / (t * self.bytes_per_token) > best[0]:
                best = (b / (t * self.bytes_per_token), step, t)
        return best


async def _one(engine: Engine, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    request = GenerationRequest(uuid.uuid4().hex, prompt, params)
    start, ttft, finish = time.perf_counter(), None, None
    async for event in engine.generate(request):
        if ttft is None:
            ttft = time.perf_counter() - start
        if isinstance(event, FinishEvent):
            finish = event
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": finish.completion_tokens if finish else 0,
        "finish_reason": finish.finish_reason if finish else "none",
        "ttft_s": round(ttft or 0.0, 3),
        "latency_s": round(time.perf_counter() - start, 3),
    }


def in_process(
    args: argparse.Namespace,
    loaded: Any,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    budget: int,
) -> dict[str, Any]:
    """Run the load on an ``Engine`` in this process, sampling after every step.

    Args:
        args: The parsed flags.
        loaded: The loaded checkpoint (``models.load``).
        tokenizer: Its tokenizer.
        prompts: Token ids per request.
        budget: ``kv_cache_max_bytes``.

    Returns:
        ``samples``, ``results`` (per request), ``wall_s``, ``preemptions``, ``rss_base``,
        ``rss_hwm``, ``hwm_reset``, ``mlx_peak_bytes`` and ``sampled`` (what one sample is).
    """
    config = SchedulerConfig(max_model_len=args.max_model_len)
    engine = Engine(loaded.model, tokenizer, config, kv_cache_max_bytes=budget)
    samples = Samples(loaded.model.cache_layout().bytes_per_token)
    plain_step = engine.step

    def step() -> None:
        plain_step()
        stats = engine.stats()
        samples.add(stats["kv_cache_bytes"], stats["kv_cache_tokens"], proc_memory("self", "VmRSS"))

    engine.start()
    try:
        asyncio.run(_one(engine, tokenizer.encode("warm up the kernels"), 4))
        steps_before = engine.steps
        engine.step = step  # after the warm-up; the engine thread looks it up on each step
        reset_ok = reset_peak_rss("self")
        rss_base = proc_memory("self", "VmRSS")
        mx.reset_peak_memory()

        async def everyone() -> list[dict[str, Any]]:
            return await asyncio.gather(*(_one(engine, p, args.max_tokens) for p in prompts))

        start = time.perf_counter()
        results = asyncio.run(everyone())
        wall = time.perf_counter() - start
        return {
            "samples": samples,
            "results": results,
            "wall_s": wall,
            "preemptions": engine.stats()["preemptions"],
            "rss_base": rss_base,
            "rss_hwm": proc_memory("self", "VmHWM"),
            "hwm_reset": reset_ok,
            "mlx_peak_bytes": mx.get_peak_memory(),
            "sampled": f"after each of {engine.steps - steps_before} engine steps",
        }
    finally:
        engine.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, build prompts, run the load under the budget (here or served), and summarise.

    Args:
        args: The parsed flags.

    Returns:
        The report (also what ``--json`` writes).
    """
    ensure_checkpoint(args.model)
    loaded = load(args.model, "float32")
    tokenizer = Tokenizer.from_dir(loaded.path)
    layout = loaded.model.cache_layout()
    chats = [conversation(tokenizer, args.long_tokens, args.long_turns, seed=1)]
    chats += [
        conversation(tokenizer, args.short_tokens, 1, seed=100 + i) for i in range(args.shorts)
    ]
    prompts = [ids for _, ids in chats]
    demand = sum(layout.row_bytes(len(p) + args.max_tokens) for p in prompts)
    budget = int(demand * args.budget_fraction)
    if args.serve:
        del loaded  # the server loads its own copy
        out = served(args, [m for m, _ in chats], budget, Samples(layout.bytes_per_token))
    else:
        out = in_process(args, loaded, tokenizer, prompts, budget)
    samples, results, wall = out["samples"], out["results"], out["wall_s"]
    ratio_all = samples.max_ratio()
    ratio_steady = samples.max_ratio(args.steady_tokens)
    output = sum(r["completion_tokens"] for r in results)
    completed = sum(
        r["completion_tokens"] == args.max_tokens and r["finish_reason"] == "length"
        for r in results
    )
    return {
        "mode": "served" if args.serve else "in-process",
        "model": str(args.model),
        "bytes_per_token": layout.bytes_per_token,
        "prompt_tokens": [len(p) for p in prompts],
        "max_tokens": args.max_tokens,
        "demand_bytes": demand,
        "budget_bytes": budget,
        "budget_fraction": args.budget_fraction,
        "requests": len(prompts),
        "completed": completed,
        "output_tokens": output,
        "sampled": out["sampled"],
        "wall_s": round(wall, 2),
        "output_tok_s": round(output / wall, 1),
        "preemptions": out["preemptions"],
        "peak_kv_bytes": max(samples.kv_bytes, default=0),
        "peak_kv_tokens": max(samples.kv_tokens, default=0),
        "max_ratio": round(ratio_all[0], 3),
        "max_ratio_sample": ratio_all[1],
        "max_ratio_tokens": ratio_all[2],
        "steady_tokens": args.steady_tokens,
        "max_ratio_steady": round(ratio_steady[0], 3),
        "max_ratio_steady_tokens": ratio_steady[2],
        "rss_base_bytes": out["rss_base"],
        "rss_peak_growth_bytes": max(out["rss_hwm"], *samples.rss, 0) - out["rss_base"],
        "rss_hwm_reset": out["hwm_reset"],
        "mlx_peak_bytes": out.get("mlx_peak_bytes"),
        "per_request": results,
        "samples": {"kv_bytes": samples.kv_bytes, "kv_tokens": samples.kv_tokens},
    }


def summary(r: dict[str, Any]) -> str:
    """The report as text, with each target's verdict.

    Args:
        r: From ``run``.

    Returns:
        The text.
    """
    prompts = r["prompt_tokens"]
    checks = [
        ("every request completed", r["completed"] == r["requests"]),
        ("peak allocated KV <= budget", r["peak_kv_bytes"] <= r["budget_bytes"]),
        (f"max allocated/held ratio <= {RATIO_LIMIT}", r["max_ratio"] <= RATIO_LIMIT),
        (
            "peak RSS growth <= budget + 400 MB",
            r["rss_peak_growth_bytes"] <= r["budget_bytes"] + RSS_ALLOWANCE,
        ),
    ]
    lines = [
        f"prompts: 1 x {prompts[0]} tokens + {len(prompts) - 1} x {min(prompts[1:])}-"
        f"{max(prompts[1:])} tokens, {r['max_tokens']} output tokens each; "
        f"{r['bytes_per_token']} bytes per token",
        f"demand {r['demand_bytes'] / MIB:.1f} MiB, budget {r['budget_bytes'] / MIB:.1f} MiB "
        f"({r['budget_fraction']:.0%})",
        f"completed {r['completed']}/{r['requests']}, {r['output_tokens']} output tokens in "
        f"{r['wall_s']} s ({r['output_tok_s']} tok/s), preemptions {r['preemptions']}",
        f"{r['mode']}; sampled {r['sampled']}",
        f"peak allocated KV {r['peak_kv_bytes'] / MIB:.2f} MiB (peak tokens held "
        f"{r['peak_kv_tokens']})",
        f"max allocated/held ratio {r['max_ratio']} (sample {r['max_ratio_sample']}, "
        f"{r['max_ratio_tokens']} tokens held); with >= {r['steady_tokens']} tokens held: "
        f"{r['max_ratio_steady']} ({r['max_ratio_steady_tokens']} tokens)",
        f"peak RSS growth {r['rss_peak_growth_bytes'] / MIB:.1f} MiB over "
        f"{r['rss_base_bytes'] / MIB:.0f} MiB (VmHWM reset: {r['rss_hwm_reset']})"
        + (f"; MLX peak {r['mlx_peak_bytes'] / MIB:.1f} MiB" if r["mlx_peak_bytes"] else ""),
    ]
    lines += [f"{'met' if ok else 'NOT MET':>8}: {name}" for name, ok in checks]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_DIR)
    p.add_argument("--long-tokens", type=int, default=3000)
    p.add_argument("--long-turns", type=int, default=11, help="messages of the long chat")
    p.add_argument("--short-tokens", type=int, default=200)
    p.add_argument("--shorts", type=int, default=15)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--budget-fraction", type=float, default=0.6)
    p.add_argument("--steady-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--serve", action="store_true", help="through a server: HTTP and /metrics")
    p.add_argument("--poll", type=float, default=0.02, help="s between /metrics reads (--serve)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run once; print the summary (and write JSON).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when every target was met, else 1.
    """
    args = parse_args(argv)
    report = run(args)
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if "NOT MET" not in summary(report) else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # MLX sometimes aborts at interpreter exit after another thread used it ("terminate
    # called without an active exception", also with bench.decode_scaling and before the
    # paged cache); leave without the teardown so that the exit code says what was measured.
    os._exit(code)
