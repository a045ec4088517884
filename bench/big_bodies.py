"""Big request bodies against running streams: /health latency, inter-token latency, memory.

Starts the bench checkpoint's server (prompt cache off, so that only the bodies can move its
memory), then runs two phases of the same load: four streaming chats (inter-token latency
measured at the client) while ``/health`` is polled every 20 ms. The second phase also posts
big chat bodies meanwhile, one after another, two seconds apart: a 5 MB message (under the
8 MiB body limit; a prompt far too long for the context) and a 50 MB one (over the limit),
``--repeats`` times each. It reports the ``/health`` p99, the streams' ITL p99 in both
phases, what each body got (status, seconds, when), and the server's resident memory before
and after the big bodies.

Targets (issue 12): ``/health`` p99 <= 50 ms, ITL p99 up by at most 20 % with the bodies,
RSS after within 100 MB of before. The health poller and the body poster run in their own
processes, so the client's own work (building and sending 50 MB) does not skew the timings.

Usage: python -m bench.big_bodies [--model DIR] [--max-tokens 300] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from bench.serverproc import ServerProcess, free_port, moeserve_command

STREAMS = 4
MB = 1_000_000


def _pct(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def _rss_bytes(pid: int) -> int:
    """Current resident set size of a process (Linux ``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _poll_health(url: str, stop, out) -> None:
    """Child process: GET /health every 20 ms until ``stop`` is set; send the latencies."""
    latencies = []
    with httpx.Client(base_url=url, timeout=300) as http:
        while not stop.is_set():
            start = time.perf_counter()
            http.get("/health")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    out.send(latencies)


def _post_bodies(url: str, model: str, repeats: int, out) -> None:
    """Child process: post 5 MB and 50 MB chat bodies in turn; send (size, status, seconds)."""

    def body(size: int) -> bytes:
        head = json.dumps({"model": model, "messages": [{"role": "user", "content": ""}]})
        cut = head.index('""') + 1
        return (head[:cut] + "x" * (size - len(head)) + head[cut:]).encode()

    bodies = {5 * MB: body(5 * MB), 50 * MB: body(50 * MB)}
    rows = []
    with httpx.Client(base_url=url, timeout=300) as http:
        for _ in range(repeats):
            for size, content in bodies.items():
                start = time.perf_counter()
                try:
                    status = http.post(
                        "/v1/chat/completions",
                        content=content,
                        headers={"Content-Type": "application/json"},
                    ).status_code
                except httpx.HTTPError as e:
                    status = f"error: {e!r}"
                # CLOCK_MONOTONIC: comparable across processes, for the timeline.
                rows.append((size, status, round(time.perf_counter() - start, 3), time.monotonic()))
                time.sleep(2.0)  # spread over the streams' lifetime
    out.send(rows)


async def _stream(client: httpx.AsyncClient, model: str, max_tokens: int) -> list[float]:
    """One streaming chat; the gaps between its content chunks, in seconds."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    gaps, last = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    return gaps


def _phase(server: ServerProcess, model: str, max_tokens: int, repeats: int) -> dict:
    """Four streams and the health poller; with ``repeats`` > 0 the big bodies as well."""
    url = f"http://127.0.0.1:{server.port}"
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    health_recv, health_send = ctx.Pipe(duplex=False)
    poller = ctx.Process(target=_poll_health, args=(url, stop, health_send))
    poller.start()
    poster, bodies_recv = None, None
    rss_before = _rss_bytes(server.process.pid)

    async def streams() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            tasks = [_stream(client, model, max_tokens) for _ in range(STREAMS)]
            running = [asyncio.create_task(t) for t in tasks]
            await asyncio.sleep(1.0)  # the streams are decoding before any body arrives
            nonlocal poster, bodies_recv
            if repeats:
                bodies_recv, bodies_send = ctx.Pipe(duplex=False)
                poster = ctx.Process(target=_post_bodies, args=(url, model, repeats, bodies_send))
                poster.start()
            return await asyncio.gather(*running)

    phase_start = time.monotonic()
    gaps = asyncio.run(streams())
    streams_end = time.monotonic()
    bodies = bodies_recv.recv() if bodies_recv is not None else []
    if poster is not None:
        poster.join()
    if bodies and bodies[-1][3] > streams_end:
        print("warning: the bodies outlasted the streams; raise --max-tokens")
    # (size, status, seconds, answered this many seconds into the phase)
    bodies = [(n, status, s, round(t - phase_start, 1)) for n, status, s, t in bodies]
    stop.set()
    health = health_recv.recv()
    poller.join()
    time.sleep(1.0)
    itl = [g for stream in gaps for g in stream]
    return {
        "health_p50_ms": round(1000 * statistics.median(health), 1),
        "health_p99_ms": round(1000 * _pct(health, 0.99), 1),
        "health_max_ms": round(1000 * max(health), 1),
        "health_polls": len(health),
        "itl_p50_ms": round(1000 * statistics.median(itl), 1),
        "itl_p99_ms": round(1000 * _pct(itl, 0.99), 1),
        "itl_max_ms": round(1000 * max(itl), 1),
        "bodies": bodies,
        "streams_seconds": round(streams_end - phase_start, 1),
        "rss_before_mb": round(rss_before / MB, 1),
        "rss_after_mb": round(_rss_bytes(server.process.pid) / MB, 1),
    }


def main() -> None:
    """Run both phases against one server and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--max-tokens", type=int, default=300, help="tokens per stream")
    parser.add_argument("--repeats", type=int, default=5, help="5 MB + 50 MB bodies, each")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ensure_checkpoint(args.model)
    log = Path(tempfile.mkdtemp(prefix="moeserve-bench-")) / "moeserve.log"
    port = free_port()
    # No prompt cache: the streams' finished sessions would grow the RSS too.
    command = moeserve_command(args.model, port, "--no-prompt-cache")
    server = ServerProcess.start(command, port, "/health", log)
    try:
        model = httpx.get(server.base_url + "/models").json()["data"][0]["id"]
        asyncio.run(_warm(server, model))
        results = {
            "without_bodies": _phase(server, model, args.max_tokens, 0),
            "with_bodies": _phase(server, model, args.max_tokens, args.repeats),
        }
    finally:
        server.stop()
    base, loaded = results["without_bodies"], results["with_bodies"]
    results["itl_p99_rise"] = round(loaded["itl_p99_ms"] / base["itl_p99_ms"] - 1, 3)
    results["rss_growth_mb"] = round(loaded["rss_after_mb"] - loaded["rss_before_mb"], 1)
    for label, row in (("without bodies", base), ("with bodies", loaded)):
        print(
            f"{label:>15}: /health p50 {row['health_p50_ms']} ms, p99 {row['health_p99_ms']} "
            f"ms, max {row['health_max_ms']} ms ({row['health_polls']} polls); ITL p50 "
            f"{row['itl_p50_ms']} ms, p99 {row['itl_p99_ms']} ms, max {row['itl_max_ms']} ms"
        )
    for size, status, seconds, at in loaded["bodies"]:
        print(f"  {size // MB:>3} MB body -> {status} in {seconds} s (answered at {at} s)")
    print(f"  the streams ran {loaded['streams_seconds']} s")
    print(
        f"ITL p99 rise with the bodies: {100 * results['itl_p99_rise']:+.1f} %; server RSS "
        f"{loaded['rss_before_mb']} MB before the bodies, {loaded['rss_after_mb']} MB after "
        f"({results['rss_growth_mb']:+.1f} MB)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


async def _warm(server: ServerProcess, model: str) -> None:
    """One short stream, so that the first phase does not pay for first-use setup."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=600) as c:
        await _stream(c, model, 8)


if __name__ == "__main__":
    main()
