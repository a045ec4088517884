"""``moeserve bench`` against a live moeserve: the user-facing load generator end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeserve.server.cli import main


def test_moeserve_bench_against_live_server(server, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--url",
            server.base_url,
            "-c",
            "2",
            "-n",
            "4",
            "--prompt-tokens",
            "32",
            "--output-tokens",
            "8",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 4 and report["failed"] == 0
    assert report["total_output_tokens"] == 4 * 8  # ignore_eos fixes the length on moeserve
    assert report["output_throughput"] > 0 and report["median_ttft_ms"] > 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "TTFT" in printed


@pytest.mark.parametrize("verbose", [False, True])
def test_bench_logs_requests_only_when_verbose(server, verbose: bool) -> None:
    argv = ["bench", "--url", server.base_url, "-c", "2", "-n", "4", "--output-tokens", "2"]
    run = subprocess.run(
        [sys.executable, "-m", "moeserve.server.cli", *argv, *(["--verbose"] if verbose else [])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 0, run.stderr
    assert "Serving Benchmark Result" in run.stdout
    logged = [line for line in run.stderr.splitlines() if "HTTP Request" in line]
    if verbose:  # the model list, the /tokenize calibration and the four streams, at least
        assert len(logged) >= 5
    else:
        assert logged == []
