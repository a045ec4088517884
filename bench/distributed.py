"""What serving across ranks costs: communication per step, step time, memory per rank.

Starts three servers of one model on loopback: one process, ``--distributed pipeline`` and
``--distributed tensor`` (two ranks each under ``mlx.launch --backend ring``), then sends the
same requests to each in turn (interleaved rounds: the machine's load hits all three alike):
a batch-1 completion of ``--tokens`` tokens and ``--concurrency`` of them at once. It
reports, per server, the median seconds per generated token (a decode step at batch 1; the
batch's steps per token), and the ratio to one process. Then it stops rank 0 of each
distributed server with SIGTERM (the other rank leaves when rank 0 says stop) and reads the
communication line each rank logs (``server.distributed.link.LinkStats``): broadcast bytes
per step, activation bytes per step (pipeline hand-offs, tensor-mode all_sum inputs) and
the time inside collectives; and each rank's weight bytes (startup line) and peak RSS.

On this 2-core machine the two ranks share the cores with each other (and whatever else
runs), so step times say little about speed across Macs; the volumes are what scale.

Usage: python -m bench.distributed [--model DIR] [--tokens 48] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.make_checkpoint import ensure_checkpoint
from bench.serverproc import ServerProcess, free_port, launcher_stdin, rank_pids

MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")
MODES = ["single", "pipeline", "tensor"]


def _command(model: Path, port: int, mode: str) -> list[str]:
    serve = [sys.executable, "-m", "moeserve.server.cli", "serve", "--model", str(model)]
    serve += ["--port", str(port), "--served-model-name", "m", "--max-model-len", "1024"]
    if mode == "single":
        return serve
    launch = [str(MLX_LAUNCH), "-n", "2", "--backend", "ring", "--"]
    return [*launch, *serve, "--distributed", mode]


def _complete(url: str, tokens: int, prompt: str) -> tuple[float, int]:
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    body["ignore_eos"] = True
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


def _per_token(url: str, tokens: int, concurrency: int) -> float:
    """Seconds per generated token of ``concurrency`` simultaneous completions."""
    prompts = [f"Request {i}: tell me about the weather in town." for i in range(concurrency)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda p: _complete(url, tokens, p), prompts))
    elapsed = time.perf_counter() - start
    return elapsed / max(d[1] for d in done)  # one step per token of the longest


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


_STATS = re.compile(
    r"rank (\d+) communication: (\d+) steps, (\d+) broadcasts \((\d+) bytes\), (\d+) activation "
    r"bytes, ([\d.]+) s in collectives"
)


def _communication(log: Path) -> dict[int, dict[str, float]]:
    out = {}
    for rank, steps, msgs, msg_bytes, act, secs in _STATS.findall(log.read_text()):
        steps_n = max(int(steps), 1)
        out[int(rank)] = {
            "steps": int(steps),
            "broadcasts": int(msgs),
            "broadcast_bytes_per_message": int(msg_bytes) / max(int(msgs), 1),
            "activation_bytes_per_step": int(act) / steps_n,
            "collective_ms_per_step": 1000 * float(secs) / steps_n,
        }
    return out


def _weights(log: Path) -> dict[int, str]:
    text = log.read_text(errors="replace")
    return {int(r): w for r, w in re.findall(r"rank (\d+) [^;]*?weights ([\d.]+ [MG]iB)", text)}


def _stop_distributed(server: ServerProcess, rank0: int) -> None:
    """SIGTERM rank 0 only: it drains, tells rank 1 to stop, and both log their totals."""
    os.kill(rank0, signal.SIGTERM)
    try:
        server.process.wait(60)
    except Exception:
        server.stop()


def run(model: Path, tokens: int, rounds: int, concurrency: int) -> dict[str, Any]:
    """Start the three servers, measure, stop them; return the figures."""
    logs = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    servers: dict[str, ServerProcess] = {}
    closers: list[Callable[[], None]] = []
    try:
        for mode in MODES:
            port = free_port()
            log = logs / f"{mode}.log"
            cmd = _command(model, port, mode)
            if mode == "single":
                servers[mode] = ServerProcess.start(cmd, port, "/health", log)
                continue
            stdin, close = launcher_stdin()  # else mlx.launch spins
            closers.append(close)
            try:
                servers[mode] = ServerProcess.start(cmd, port, "/health", log, stdin=stdin)
            finally:
                os.close(stdin)  # the launcher has its own copy
        urls = {m: s.base_url.removesuffix("/v1") for m, s in servers.items()}
        for url in urls.values():  # warm up: first-call compilation and allocation
            _complete(url, 4, "warm up")
        timings: dict[str, dict[str, list[float]]] = {m: {"b1": [], "bN": []} for m in MODES}
        for _ in range(rounds):
            for mode in MODES:
                timings[mode]["b1"].append(_per_token(urls[mode], tokens, 1))
                timings[mode]["bN"].append(_per_token(urls[mode], tokens, concurrency))
        pids = {m: rank_pids(servers[m].log, timeout=0) for m in MODES if m != "single"}
        rss = {m: {r: _peak_rss(p) for r, p in pids[m].items()} for m in pids}
        rss["single"] = {0: _peak_rss(servers["single"].process.pid)}
    finally:
        for mode, server in servers.items():
            pid0 = rank_pids(server.log, timeout=0).get(0)
            if mode != "single" and pid0 is not None:
                _stop_distributed(server, pid0)
            server.stop()
        for close in closers:
            close()
    result: dict[str, Any] = {"model": str(model), "tokens": tokens, "rounds": rounds}
    single = {k: statistics.median(v) for k, v in timings["single"].items()}
    for mode in MODES:
        med = {k: statistics.median(v) for k, v in timings[mode].items()}
        result[mode] = {
            "ms_per_token_batch1": 1000 * med["b1"],
            f"ms_per_step_batch{concurrency}": 1000 * med["bN"],
            "vs_single_batch1": med["b1"] / single["b1"],
            f"vs_single_batch{concurrency}": med["bN"] / single["bN"],
            "peak_rss_mib": {r: b / 2**20 for r, b in rss[mode].items()},
        }
        if mode != "single":
            result[mode]["communication"] = _communication(servers[mode].log)
            result[mode]["weights"] = _weights(servers[mode].log)
    result["logs"] = str(logs)
    return result


def main() -> None:
    """Parse the flags, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the bench model")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    model = args.model or ensure_checkpoint()
    result = run(model, args.tokens, args.rounds, args.concurrency)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
