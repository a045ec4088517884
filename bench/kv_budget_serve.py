"""The served run of ``bench/kv_budget.py``: the same load over HTTP, watched through /metrics.

Starts ``moeserve serve`` from this checkout (``bench/serverproc.py``) with
``--kv-cache-max-bytes BUDGET``, the prompt cache off (finished requests' snapshots would
count in its RSS but not in the KV budget) and ``--max-model-len``; after one warm-up
request it resets the server's peak RSS (``/proc/PID/clear_refs``), then sends every chat at
once as a streaming ``/v1/chat/completions`` request (greedy, ``ignore_eos``, fixed
``max_tokens``) while a thread reads ``/metrics`` every ``--poll`` seconds:
``moeserve_kv_cache_bytes``, ``moeserve_kv_cache_tokens``, ``moeserve_preemptions_total``,
and the server's ``VmRSS``.

A poll sees whatever the engine published after its last step; steps shorter than the poll
interval may go unseen, so peaks read here are lower bounds of what the in-process run
samples after every step. It knows HTTP, the Prometheus text format and ``/proc``; not the
engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.serverproc import ServerProcess, free_port, moeserve_command

METRICS = ("moeserve_kv_cache_bytes", "moeserve_kv_cache_tokens", "moeserve_preemptions_total")


def read_metrics(text: str) -> dict[str, float]:
    """The samples of ``METRICS`` in a Prometheus text exposition (unlabelled lines).

    Args:
        text: The ``/metrics`` body.

    Returns:
        Name -> value, for those present.
    """
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in METRICS:
            out[name] = float(value)
    return out


def proc_memory(pid: int | str, name: str) -> int:
    """One memory line of ``/proc/PID/status`` in bytes (0 when unreadable).

    Args:
        pid: A process id, or ``"self"``.
        name: ``VmRSS`` or ``VmHWM``.

    Returns:
        Bytes.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int | str) -> bool:
    """Reset a process's ``VmHWM`` to its current RSS (``echo 5 > /proc/PID/clear_refs``).

    Args:
        pid: A process id (of this user), or ``"self"``.

    Returns:
        Whether it worked.
    """
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_memory(pid, "VmHWM") <= proc_memory(pid, "VmRSS") + (1 << 20)


async def _chat(
    client: httpx.AsyncClient, base: str, model: str, messages: list[dict], max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, ttft, usage, finish, error = time.perf_counter(), None, {}, "none", ""
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                error = str(chunk["error"])
            for choice in chunk.get("choices") or []:
                if ttft is None and (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - start
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    return {
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "finish_reason": finish,
        "error": error,
        "ttft_s": round(ttft or 0.0, 3),
        "latency_s": round(time.perf_counter() - start, 3),
    }


async def _all(base: str, chats: list[list[dict]], max_tokens: int) -> list[dict[str, Any]]:
    timeout = httpx.Timeout(3600)
    limits = httpx.Limits(max_connections=len(chats) + 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
        return await asyncio.gather(*(_chat(client, base, model, m, max_tokens) for m in chats))


def served(
    args: argparse.Namespace, chats: list[list[dict]], budget: int, samples: Any
) -> dict[str, Any]:
    """Serve, warm up, run every chat at once while polling ``/metrics``.

    Args:
        args: ``kv_budget``'s flags (model, max_tokens, max_model_len, poll).
        chats: Messages per request.
        budget: ``--kv-cache-max-bytes``.
        samples: ``kv_budget.Samples`` to fill (``add(kv_bytes, kv_tokens, rss)``).

    Returns:
        What ``kv_budget.in_process`` returns, with the server's figures (no MLX peak).
    """
    port = free_port()
    flags = ["--kv-cache-max-bytes", str(budget), "--no-prompt-cache"]
    flags += ["--max-model-len", str(args.max_model_len), "--log-level", "warning"]
    log = Path(tempfile.mkdtemp(prefix="moeserve-kv-budget-")) / "server.log"
    server = ServerProcess.start(moeserve_command(args.model, port, *flags), port, "/health", log)
    base, pid = f"http://127.0.0.1:{port}", server.process.pid
    try:
        warm = [[{"role": "user", "content": "warm up the kernels"}]]
        asyncio.run(_all(base, warm, 4))
        reset_ok = reset_peak_rss(pid)
        rss_base = proc_memory(pid, "VmRSS")
        stop = threading.Event()
        last: dict[str, float] = {}

        def poll() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    last.update(read_metrics(client.get(f"{base}/metrics").text))
                    samples.add(
                        int(last.get(METRICS[0], 0)),
                        int(last.get(METRICS[1], 0)),
                        proc_memory(pid, "VmRSS"),
                    )
                    stop.wait(args.poll)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        start = time.perf_counter()
        results = asyncio.run(_all(base, chats, args.max_tokens))
        wall = time.perf_counter() - start
        stop.set()
        poller.join()
        last.update(read_metrics(httpx.get(f"{base}/metrics", timeout=10).text))
        return {
            "samples": samples,
            "results": results,
            "wall_s": wall,
            "preemptions": int(last.get(METRICS[2], 0)),
            "rss_base": rss_base,
            "rss_hwm": proc_memory(pid, "VmHWM"),
            "hwm_reset": reset_ok,
            "mlx_peak_bytes": None,
            "sampled": f"{len(samples.kv_bytes)} /metrics polls, {args.poll} s apart",
        }
    finally:
        server.stop()
