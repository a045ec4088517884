"""Time to first token of a 10-turn chat with and without the per-session prompt cache.

A 1,500-token system prompt and ten 100-token user turns (replies of a fixed length, greedy)
against the bench checkpoint, first on a server with the prompt cache, then on one started
with ``--no-prompt-cache``, in the same run. Then 8 concurrent sessions sharing the system
prompt (cache on): hit rate (cached / prompt tokens from ``usage``) and the memory the cache
holds (``GET /v1/sessions``) and the server's peak RSS.

Usage: python -m bench.prompt_cache [--model DIR] [--turns 10] [--sessions 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from bench.serverproc import ServerProcess, free_port, moeserve_command

REPLY_TOKENS = 16


def _words(n: int, rng: random.Random) -> str:
    vocab = (
        "model token cache server request stream batch expert router layer prompt "
        "session turn reply system user answer question memory budget"
    ).split()
    return " ".join(rng.choice(vocab) for _ in range(n))


async def _tokens(client: httpx.AsyncClient, url: str, text: str) -> int:
    r = await client.post(url.removesuffix("/v1") + "/tokenize", json={"prompt": text})
    return r.json()["count"]


async def _fit(client: httpx.AsyncClient, url: str, target: int, seed: int) -> str:
    """Text of about ``target`` tokens (calibrated with the server's tokenizer)."""
    rng = random.Random(seed)
    words = target
    for _ in range(6):
        text = _words(words, rng)
        count = await _tokens(client, url, text)
        if abs(count - target) <= target * 0.03:
            return text
        words = max(1, round(words * target / count))
        rng = random.Random(seed)
    return text


async def _turn(client, url, model, messages, session) -> tuple[float, str, dict]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": REPLY_TOKENS,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        "prompt_cache_key": session,
    }
    start, ttft, text, usage = time.perf_counter(), None, [], {}
    async with client.stream("POST", url + "/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content")
                if piece and ttft is None:
                    ttft = time.perf_counter() - start
                text.append(piece or "")
    return ttft or (time.perf_counter() - start), "".join(text), usage


async def _chat(client, url, model, system, users, session) -> list[dict]:
    messages, rows = [{"role": "system", "content": system}], []
    for user in users:
        messages.append({"role": "user", "content": user})
        ttft, reply, usage = await _turn(client, url, model, messages, session)
        messages.append({"role": "assistant", "content": reply})
        rows.append(
            {
                "ttft_s": round(ttft, 4),
                "prompt_tokens": usage.get("prompt_tokens"),
                "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens"),
            }
        )
    return rows


def _serve(model: Path, log_dir: Path, *flags: str) -> ServerProcess:
    port = free_port()
    return ServerProcess.start(
        moeserve_command(model, port, *flags), port, "/health", log_dir / f"moeserve-{port}.log"
    )


async def _scenario(url: str, turns: int, sessions: int, concurrent: bool) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(url + "/models")).json()["data"][0]["id"]
        system = await _fit(client, url, 1500, seed=1)
        users = [
            [await _fit(client, url, 100, seed=100 * s + t) for t in range(turns)]
            for s in range(sessions)
        ]
        if not concurrent:
            return {"turns": await _chat(client, url, model, system, users[0], "bench-0")}
        start = time.perf_counter()
        chats = await asyncio.gather(
            *[_chat(client, url, model, system, users[s], f"s{s}") for s in range(sessions)]
        )
        elapsed = time.perf_counter() - start
        sessions_info = (await client.get(url + "/sessions")).json()
    prompt = sum(r["prompt_tokens"] for chat in chats for r in chat)
    cached = sum(r["cached_tokens"] for chat in chats for r in chat)
    later = [r["ttft_s"] for chat in chats for r in chat[1:]]
    return {
        "seconds": round(elapsed, 2),
        "hit_rate": round(cached / prompt, 3),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "p50_ttft_turns_2_plus_s": round(statistics.median(later), 4),
        "cache_bytes": sessions_info["bytes"],
        "cached_sessions": len(sessions_info["data"]),
    }


def main() -> None:
    """Run both servers and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ensure_checkpoint(args.model)
    logs = Path(tempfile.mkdtemp(prefix="moeserve-bench-"))
    results: dict = {}
    for label, flags in (("cache", ()), ("no_cache", ("--no-prompt-cache",))):
        server = _serve(args.model, logs, *flags)
        try:
            results[label] = asyncio.run(_scenario(server.base_url, args.turns, 1, False))
        finally:
            server.stop()
    server = _serve(args.model, logs)
    try:
        results["concurrent"] = asyncio.run(
            _scenario(server.base_url, args.turns, args.sessions, True)
        )
        results["concurrent"]["peak_rss_bytes"] = server.peak_rss_bytes()
    finally:
        server.stop()
    warm = [r["ttft_s"] for r in results["cache"]["turns"][1:]]
    cold = [r["ttft_s"] for r in results["no_cache"]["turns"][1:]]
    results["ratio_mean_ttft_turns_2_plus"] = round(
        statistics.mean(warm) / statistics.mean(cold), 3
    )
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT cache':>11} {'TTFT none':>10}")
    for i, (w, c) in enumerate(zip(results["cache"]["turns"], results["no_cache"]["turns"])):
        print(
            f"{i + 1:>4} {w['prompt_tokens']:>7} {w['cached_tokens']:>7} "
            f"{w['ttft_s']:>10.3f}s {c['ttft_s']:>9.3f}s"
        )
    print(
        f"mean TTFT turns 2-{args.turns}: cache/no-cache = "
        f"{results['ratio_mean_ttft_turns_2_plus']:.3f}"
    )
    print("8 concurrent sessions:", json.dumps(results["concurrent"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
