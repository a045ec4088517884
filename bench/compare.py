"""moeserve against mlx_lm.server, side by side: same checkpoint, same loads, same BLAS.

Builds the bench checkpoint if it is missing (``bench/make_checkpoint.py``), then starts each
server in turn on a free loopback port, from this interpreter's environment:

* ``python -m moeserve.server.cli serve --model DIR --port P --dtype float32`` (ready: ``/health``);
* ``python -m mlx_lm server --model DIR --port P`` (ready: ``/v1/models`` answers 200; its body
  may be empty offline, where the Hugging Face cache scan behind it fails after the status
  line). Requests name the model ``default_model``, mlx_lm.server's name for ``--model``.

Each server gets a warm-up request, then the same loads from ``devtools/loadgen.py``: every
concurrency C of ``--concurrency`` (default 1 4 16 32) with ~200-token prompts and 128 output
tokens, N = max(4, 2C) requests (``--num-requests`` fixes N; ``--quick`` uses N = max(2, C)),
then ~2,000-token prompts with 4 output tokens, one at a time, for prefill speed (prompt tokens
/ TTFT, median of ``--prefill-requests``). Peak RSS (Linux ``VmHWM``, the process's high-water
mark since start, so model loading counts; elsewhere ``ps`` RSS sampled during the run) is
read during each run; the comparison uses the concurrency-16 run (else the largest C).

Fairness, and what is not equal:

* **Same prompts.** moeserve runs first and calibrates prompt lengths with its ``/tokenize``;
  mlx_lm.server (which has none) is sent exactly the same texts (words and seeds). Every run
  uses its own seed so that no server can reuse a prompt cached in an earlier run.
* **Same BLAS.** moeserve loads an optimized BLAS itself when one is installed (``MOESERVE_BLAS``,
  ``models/backend/blas.py``). mlx_lm.server would keep MLX's bundled reference BLAS, so it is
  started with ``LD_PRELOAD=<the library models.backend.blas chose>`` when that is a file: like
  with like.
  moeserve's gemv shim (``models/backend/gemv_forward.c``, one-row products through ``sgemv``) is
  moeserve's own code and is not given to mlx_lm.server.
* **Output length.** Requests carry ``ignore_eos``/``min_tokens``, which mlx_lm.server ignores:
  there a response may stop early at EOS. Token counts come from ``usage`` either way, so
  tok/s stays honest; compare ``total_output_tokens`` to see whether it happened.
* **Connection bursts.** mlx_lm.server is a ``ThreadingHTTPServer`` with Python's default listen
  backlog of 5; when 16 or 32 clients connect at once while its generation thread holds the
  GIL, some connections are reset before any response (httpx ``ReadError``; a third to a half
  of the requests at C=32 here). So the first wave of every run starts ``--stagger`` seconds
  apart (default 0.05; 0 sends all at once, as ``vllm bench serve`` does), for both servers.
  Runs that still have failed requests are listed under ``notes``.
* Each server keeps its own defaults otherwise (moeserve: 32 running sequences, 512-token
  prefill chunks; mlx_lm.server: decode concurrency 32, prompt concurrency 8, 2048-token
  prefill steps). The client runs on the same machine and takes some CPU from both.

Usage: python -m bench.compare [--model DIR] [--concurrency 1 4 16 32] [--skip-mlx-lm]
       [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from bench.serverproc import ServerProcess, free_port, moeserve_command
from moeserve.devtools.loadgen import run_load
from moeserve.models.backend.blas import blas_path, preloadable

MLX_LM_MODEL = "default_model"  # mlx_lm.server's name for the model given by --model
MB = 1 << 20


class RssSampler:
    """Samples a server's peak RSS on a thread while a load runs (``with`` block)."""

    def __init__(self, server: ServerProcess, interval: float = 0.25):
        self.server, self.interval, self.peak = server, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.server.peak_rss_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.peak_rss_bytes())


# "same": mlx_lm.server gets moeserve's BLAS (like with like); "bundled": it runs as installed,
# on MLX's reference BLAS, which is what a user gets without LD_PRELOAD.
MLX_LM_BLAS = {"mode": "same"}


def check_serve_command() -> None:
    """Fail early, and clearly, when this checkout's ``moeserve serve`` cannot take a port.

    Raises:
        RuntimeError: If ``serve --help`` does not list ``--port``.
    """
    cmd = [sys.executable, "-m", "moeserve.server.cli", "serve", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if "--port" not in out.stdout:
        raise RuntimeError(f"`moeserve serve --help` lists no --port:\n{out.stdout}{out.stderr}")


def _load(server: ServerProcess, model: str | None, **kwargs: Any) -> dict[str, Any]:
    return asyncio.run(run_load(server.base_url, model, **kwargs))


def bench_server(
    server: ServerProcess, model: str | None, args: argparse.Namespace, words: dict[str, int]
) -> dict[str, Any]:
    """Run every load against one server.

    Args:
        server: The running server.
        model: The model name its requests use (None: the first it lists).
        args: The parsed flags.
        words: Prompt word counts by load (``chat``, ``prefill``); filled in by the first
            server (calibrated with its ``/tokenize``) and reused by the next.

    Returns:
        ``{"runs": [...], "prefill": {...}}``.
    """
    chat = {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}
    _load(server, model, concurrency=1, num_requests=1, **{**chat, "output_tokens": 8})  # warm-up
    runs = []
    for c in args.concurrency:
        n = args.num_requests or (max(2, c) if args.quick else max(4, 2 * c))
        with RssSampler(server) as rss:
            report = _load(
                server,
                model,
                concurrency=c,
                num_requests=n,
                prompt_words=words.get("chat"),
                seed=1000 + c,
                stagger=args.stagger,
                **chat,
            )
        words.setdefault("chat", report["prompt_words"])
        report["peak_rss_mb"] = rss.peak / MB
        runs.append(report)
    prefill = _load(
        server,
        model,
        concurrency=1,
        num_requests=args.prefill_requests,
        prompt_tokens=args.prefill_tokens,
        output_tokens=args.prefill_output,
        prompt_words=words.get("prefill"),
        seed=7,
    )
    words.setdefault("prefill", prefill["prompt_words"])
    prompt_len = prefill["total_input_tokens"] / max(1, prefill["completed"])
    ttft_s = prefill["median_ttft_ms"] / 1000
    prefill["prefill_tok_s"] = prompt_len / ttft_s if ttft_s else 0.0
    return {"runs": runs, "prefill": prefill}


def start_server(name: str, model_dir: Path, log_dir: Path, timeout: float) -> ServerProcess:
    """Start moeserve or mlx_lm.server on a free loopback port and wait until it serves.

    Args:
        name: ``moeserve`` or ``mlx_lm``.
        model_dir: The checkpoint.
        log_dir: Where the server's output goes.
        timeout: Seconds to wait for readiness.

    Returns:
        The running server.
    """
    port = free_port()
    log = log_dir / f"{name}-{port}.log"
    if name == "moeserve":
        return ServerProcess.start(
            moeserve_command(model_dir, port), port, "/health", log, timeout=timeout
        )
    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    blas = blas_path() if MLX_LM_BLAS["mode"] == "same" else None
    env = {"LD_PRELOAD": blas} if blas else {}
    return ServerProcess.start(cmd, port, "/v1/models", log, env=env, timeout=timeout)


def _reference_run(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    return next((r for r in runs if r["max_concurrency"] == 16), runs[-1])


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The figures compared across servers.

    Args:
        result: One server's ``bench_server`` result.

    Returns:
        Output tok/s, p50 TTFT and p50 ITL per concurrency, prefill tok/s, peak RSS.
    """
    row: dict[str, float] = {}
    for run in result["runs"]:
        c = run["max_concurrency"]
        row[f"output_tok_s@c{c}"] = run["output_throughput"]
        row[f"p50_ttft_ms@c{c}"] = run["median_ttft_ms"]
        row[f"p50_itl_ms@c{c}"] = run["median_itl_ms"]
    row["prefill_tok_s"] = result["prefill"]["prefill_tok_s"]
    row["peak_rss_mb"] = _reference_run(result)["peak_rss_mb"]
    return row


def table(name: str, result: dict[str, Any]) -> str:
    """One server's runs as a text table.

    Args:
        name: The server's name.
        result: Its ``bench_server`` result.

    Returns:
        The table.
    """
    cols = (
        "C",
        "N",
        "failed",
        "out tok",
        "dur s",
        "out tok/s",
        "p50 TTFT",
        "p99 TTFT",
        "p50 ITL",
        "p50 TPOT",
        "RSS MB",
    )
    lines = [f"== {name}", "".join(f"{c:>10}" for c in cols)]
    for r in result["runs"]:
        cells = (
            r["max_concurrency"],
            r["num_prompts"],
            r["failed"],
            r["total_output_tokens"],
            f"{r['duration']:.1f}",
            f"{r['output_throughput']:.1f}",
            f"{r['median_ttft_ms']:.0f}",
            f"{r['p99_ttft_ms']:.0f}",
            f"{r['median_itl_ms']:.1f}",
            f"{r['median_tpot_ms']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
        )
        lines.append("".join(f"{c:>10}" for c in cells))
    p = result["prefill"]
    lines.append(
        f"prefill: {p['total_input_tokens'] / max(1, p['completed']):.0f}-token prompt, "
        f"p50 TTFT {p['median_ttft_ms']:.0f} ms, {p['prefill_tok_s']:.0f} prompt tok/s"
    )
    return "\n".join(lines)


def ratios(moe: dict[str, Any], mlx: dict[str, Any]) -> dict[str, float]:
    """The ratio moeserve / mlx_lm of each headline figure.

    Args:
        moe: moeserve's ``bench_server`` result.
        mlx: mlx_lm.server's.

    Returns:
        The ratios (above 1: moeserve higher, which is better for tok/s, worse for ms and MB).
    """
    a, b = headline(moe), headline(mlx)
    return {k: a[k] / b[k] for k in a if b.get(k)}


def failure_notes(results: dict[str, Any]) -> list[str]:
    """One line per run with failed requests: its figures cover the completed ones only.

    Args:
        results: ``bench_server`` results by server name.

    Returns:
        The notes (empty when every request completed).
    """
    notes = []
    for name, result in results.items():
        for run in [*result["runs"], result["prefill"]]:
            if run["failed"]:
                notes.append(
                    f"{name} c={run['max_concurrency']} ({run['total_input_tokens']} input "
                    f"tokens): {run['failed']}/{run['num_prompts']} failed {run['errors']}; "
                    "the figures cover the completed requests only"
                )
    return notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_DIR, help="checkpoint (built if missing)")
    p.add_argument("--concurrency", "-c", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--num-requests", "-n", type=int, default=None, help="N for every C")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=2000)
    p.add_argument("--prefill-output", type=int, default=4)
    p.add_argument("--prefill-requests", type=int, default=2)
    p.add_argument("--stagger", type=float, default=0.05, help="s between first-wave starts")
    p.add_argument("--skip-mlx-lm", action="store_true", help="run moeserve only")
    p.add_argument(
        "--mlx-lm-blas",
        choices=["same", "bundled"],
        default="same",
        help="same: preload moeserve's BLAS into mlx_lm.server; bundled: as installed",
    )
    p.add_argument("--quick", action="store_true", help="N = max(2, C): one wave per run")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build, serve, load, compare; print tables and ratios, optionally write JSON.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when every request of every run completed, else 1.
    """
    args = parse_args(argv)
    MLX_LM_BLAS["mode"] = args.mlx_lm_blas
    if args.mlx_lm_blas == "same" and blas_path() is not None and not preloadable():
        # The scipy-openblas32 wheel's symbols are prefixed: LD_PRELOAD would silently leave
        # mlx_lm.server on the reference BLAS.
        raise SystemExit("--mlx-lm-blas same needs a system OpenBLAS (MOESERVE_BLAS=system)")
    ensure_checkpoint(args.model)
    check_serve_command()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="moeserve-compare-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    names = ["moeserve"] + ([] if args.skip_mlx_lm else ["mlx_lm"])
    results: dict[str, Any] = {}
    words: dict[str, int] = {}
    for name in names:
        started = time.perf_counter()
        server = start_server(name, args.model, log_dir, args.startup_timeout)
        try:
            ready_s = time.perf_counter() - started
            model = MLX_LM_MODEL if name == "mlx_lm" else None  # None: first of /v1/models
            results[name] = {"startup_s": ready_s, **bench_server(server, model, args, words)}
        finally:
            server.stop()
        print(table(name, results[name]), flush=True)
    out: dict[str, Any] = {"blas": blas_path(), "log_dir": str(log_dir), "servers": results}
    if "mlx_lm" in results:
        out["ratios_moeserve_over_mlx_lm"] = ratios(results["moeserve"], results["mlx_lm"])
        print("== moeserve / mlx_lm")
        for key, value in out["ratios_moeserve_over_mlx_lm"].items():
            print(f"{key:>24} {value:8.2f}x")
    out["notes"] = failure_notes(results)
    for note in out["notes"]:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 1 if out["notes"] else 0


if __name__ == "__main__":
    sys.exit(main())
