"""Two revisions of moeserve served side by side, the same load alternating between them.

For each git revision given (``before`` and ``after``), ``git archive`` writes its
``server/``, ``models/`` and ``devtools/`` into a temporary ``moeserve`` package; a server
started with that directory first on ``PYTHONPATH`` imports that revision, not the editable
install of this checkout (checked before serving: ``moeserve.models.__path__`` must point
there). Both servers run at once (``--dtype float32``, their own defaults otherwise) and
``devtools/loadgen.py`` sends them the same load in turn, ``--runs`` times each, in the order
A B B A A B ... so that a slow spell of this shared machine lands on both alike. Run k uses
prompt seed ``1000 + k`` on both servers: the same prompts for A and B, never the same
prompts twice on one server (its prompt cache would answer them).

Reports per run and as medians: output tok/s, TTFT p50/p99, ITL p50/p99, the ratio
after / before of each median, and the median of the per-pair ratios (run k of each server,
neighbours in time, so a slow spell weighs on both sides of a pair); peak RSS (``VmHWM``) of
each server at the end (MiB, as ``peak_rss_mb`` in the JSON).

It knows git, process environments and the load generator's report; not what changed
between the revisions.

Usage: python -m bench.before_after BEFORE AFTER [--runs 5] [-c 16] [-n 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from bench.serverproc import ServerProcess, free_port, moeserve_command
from moeserve.devtools.loadgen import run_load

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("server", "models", "devtools")  # pyproject's package-dir for moeserve.*
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")
MB = 1 << 20


def export_revision(rev: str, root: Path) -> Path:
    """Write ``rev``'s package directories as ``root/moeserve/...``.

    Args:
        rev: A git revision of this repository.
        root: An empty directory.

    Returns:
        The directory to put first on ``PYTHONPATH``.
    """
    package = root / "moeserve"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    archive = root / "src.tar"
    subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), rev, *PACKAGE_DIRS],
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(package, filter="data")
    archive.unlink()
    return root


def check_import(pythonpath: Path) -> str:
    """Where ``moeserve.models`` comes from with ``pythonpath`` first (must be inside it).

    Args:
        pythonpath: From ``export_revision``.

    Returns:
        The package path.

    Raises:
        RuntimeError: The editable install of this checkout won.
    """
    code = "import moeserve.models as m; print(list(m.__path__)[0])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=pythonpath,
        env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
    ).stdout.strip()
    if not out.startswith(str(pythonpath)):
        raise RuntimeError(f"moeserve.models came from {out}, not {pythonpath}")
    return out


def start(pythonpath: Path, model: Path, log: Path) -> ServerProcess:
    """A moeserve server of the exported revision on a free port.

    Args:
        pythonpath: From ``export_revision``.
        model: Checkpoint.
        log: Its output file.

    Returns:
        The running server.
    """
    port = free_port()
    env = {"PYTHONPATH": str(pythonpath)}
    cmd = moeserve_command(model, port)
    return ServerProcess.start(cmd, port, "/health", log, env=env, timeout=600, cwd=pythonpath)


def one_run(server: ServerProcess, args: argparse.Namespace, seed: int, words: int | None) -> dict:
    """One load against one server.

    Args:
        server: The server.
        args: The flags (concurrency, requests, lengths, stagger).
        seed: Prompt seed.
        words: Words per prompt (None: calibrate with the server's ``/tokenize``).

    Returns:
        The load generator's report.
    """
    return asyncio.run(
        run_load(
            server.base_url,
            None,
            concurrency=args.concurrency,
            num_requests=args.num_requests,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            prompt_words=words,
            seed=seed,
            stagger=args.stagger,
        )
    )


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median of each reported metric over runs."""
    return {m: statistics.median(r[m] for r in runs) for m in METRICS}


def paired_ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Median over k of after run k / before run k (adjacent in time in the A B B A order).

    Args:
        runs: Reports by label, in run order.

    Returns:
        Metric -> median ratio.
    """
    pairs = list(zip(runs["before"], runs["after"]))
    return {m: statistics.median(a[m] / b[m] for b, a in pairs if b[m]) for m in METRICS}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Export, serve, alternate the loads, summarise.

    Args:
        args: The parsed flags.

    Returns:
        ``{"revisions", "runs": {label: [...]}, "medians", "ratios", "peak_rss_mb"}``.
    """
    ensure_checkpoint(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="moeserve-before-after-"))
    labels = {"before": args.before, "after": args.after}
    servers: dict[str, ServerProcess] = {}
    try:
        for label, rev in labels.items():
            path = export_revision(rev, tmp / label)
            print(f"{label}: {rev} -> {check_import(path)}", flush=True)
            servers[label] = start(path, args.model, tmp / f"{label}.log")
        words = None
        for server in servers.values():  # warm-up; the first calibrates the prompts
            report = one_run(
                server, argparse.Namespace(**{**vars(args), "num_requests": 2}), 1, words
            )
            words = words or report["prompt_words"]
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
        order = ["before", "after", "after", "before"]
        for k in range(args.runs * 2):
            label = order[k % 4]
            seed = 1000 + len(runs[label])
            report = one_run(servers[label], args, seed, words)
            report = {m: report[m] for m in (*METRICS, "failed", "total_output_tokens", "duration")}
            runs[label].append(report)
            cells = " ".join(f"{m}={report[m]:.1f}" for m in METRICS)
            print(f"{label:>6} seed {seed}: {cells} failed={report['failed']}", flush=True)
        rss = {label: s.peak_rss_bytes() / MB for label, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    med = {label: medians(r) for label, r in runs.items()}
    return {
        "revisions": labels,
        "load": {k: getattr(args, k) for k in ("concurrency", "num_requests", "prompt_tokens")}
        | {"output_tokens": args.output_tokens, "prompt_words": words},
        "runs": runs,
        "medians": med,
        "ratios": {m: med["after"][m] / med["before"][m] for m in METRICS if med["before"][m]},
        "paired_ratios": paired_ratios(runs),
        "peak_rss_mb": rss,
        "logs": str(tmp),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="git revision A")
    p.add_argument("after", help="git revision B")
    p.add_argument("--runs", type=int, default=5, help="loads per server")
    p.add_argument("--concurrency", "-c", type=int, default=16)
    p.add_argument("--num-requests", "-n", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--stagger", type=float, default=0.05, help="s between first-wave starts")
    p.add_argument("--model", type=Path, default=DEFAULT_DIR)
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print medians and ratios (and write JSON).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when every request of every run completed, else 1.
    """
    args = parse_args(argv)
    out = compare(args)
    print(f"{'metric':>18} {'before':>9} {'after':>9} {'after/before':>13} {'paired':>8}")
    for m in METRICS:
        b, a = out["medians"]["before"][m], out["medians"]["after"][m]
        ratio, paired = out["ratios"].get(m, 0), out["paired_ratios"][m]
        print(f"{m:>18} {b:9.1f} {a:9.1f} {ratio:12.3f}x {paired:7.3f}x")
    print("peak RSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in out["peak_rss_mb"].items()))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 1 if any(r["failed"] for runs in out["runs"].values() for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
