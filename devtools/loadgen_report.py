"""The load generator's report: per-request results aggregated as ``vllm bench serve`` does.

``summarize`` turns ``RequestResult``s into throughput, time to first token (TTFT), time per
output token (TPOT = (latency - TTFT) / (output tokens - 1)) and inter-token latency (ITL), as
mean, median and p99 in milliseconds under ``vllm bench serve``'s names (percentiles interpolate
linearly, as numpy's default does); ``format_report`` prints them in that tool's table layout.

It knows only numbers already measured: it sends nothing and knows no server or HTTP
(``loadgen_request`` measures, ``loadgen.run_load`` drives the load).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from moeserve.devtools.loadgen_request import RequestResult


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict[str, Any]:
    """Aggregate per-request results under ``vllm bench serve``'s metric names.

    Args:
        results: One per request, failed ones included.
        duration: Wall-clock seconds from the first request sent to the last one done.
        concurrency: The client concurrency used.

    Returns:
        The report (times in ms, throughputs per second).
    """
    done = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    series = {
        "ttft": [r.ttft * 1000 for r in done if r.ttft is not None],
        "tpot": [
            (r.latency - r.ttft) * 1000 / (r.output_tokens - 1)
            for r in done
            if r.ttft is not None and r.output_tokens > 1
        ],
        "itl": [gap * 1000 for r in done for gap in r.itl],
        "e2el": [r.latency * 1000 for r in done],
    }
    report: dict[str, Any] = {
        "num_prompts": len(results),
        "max_concurrency": concurrency,
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    for name, values in series.items():
        report[f"mean_{name}_ms"] = statistics.fmean(values) if values else 0.0
        report[f"median_{name}_ms"] = _percentile(values, 50)
        report[f"p99_{name}_ms"] = _percentile(values, 99)
    report["errors"] = sorted({r.error for r in results if r.error})[:5]
    return report


_TABLE = (
    ("Successful requests", "completed", "d"),
    ("Failed requests", "failed", "d"),
    ("Maximum request concurrency", "max_concurrency", "d"),
    ("Benchmark duration (s)", "duration", ".2f"),
    ("Total input tokens", "total_input_tokens", "d"),
    ("Total generated tokens", "total_output_tokens", "d"),
    ("Request throughput (req/s)", "request_throughput", ".2f"),
    ("Output token throughput (tok/s)", "output_throughput", ".2f"),
    ("Total token throughput (tok/s)", "total_token_throughput", ".2f"),
)

_SERIES = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token"),
           ("itl", "Inter-token Latency"))  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    """A human table in the layout of ``vllm bench serve``.

    Args:
        report: From ``run_load``.

    Returns:
        The table text.
    """
    lines = [f"{' Serving Benchmark Result ':=^50}"]
    lines += [f"{label + ':':<40}{report[key]:<10{fmt}}" for label, key, fmt in _TABLE]
    for name, title in _SERIES:
        lines.append(f"{' ' + title + ' ':-^50}")
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {name.upper()} (ms):"
            lines.append(f"{label:<40}{report[f'{stat}_{name}_ms']:<10.2f}")
    lines.append("=" * 50)
    lines += [f"error: {e}" for e in report.get("errors", [])]
    return "\n".join(lines)
