"""Two ranks of ``moeserve serve --distributed`` under ``mlx.launch`` on loopback.

``launch(model_dir, mode, *flags)`` runs ``mlx.launch -n 2 --backend ring -- python -m
moeserve.server.cli serve ...`` in its own process group (through ``bench/serverproc.py``),
waits for rank 0's ``/health``, and stops every rank at the end of the test. The launcher
gets a standard input that stays open: on a closed one its input loop never sleeps. The ranks' pids
come from the startup line each rank logs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.serverproc import ServerProcess, free_port
from tests.distributed.checkpoints import family_checkpoint

REPO = Path(__file__).resolve().parents[2]
MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")
COMMON_FLAGS = ["--max-model-len", "512", "--served-model-name", "m"]


def distributed_command(model: Path, port: int, mode: str, *flags: str) -> list[str]:
    """The ``mlx.launch`` command line of a two-rank server on loopback.

    Args:
        model: Model directory.
        port: Rank 0's port.
        mode: ``pipeline`` or ``tensor``.
        *flags: Extra ``serve`` flags.

    Returns:
        The argv.
    """
    serve = [sys.executable, "-m", "moeserve.server.cli", "serve", "--model", str(model)]
    serve += [
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--served-model-name",
        "m",
        "--distributed",
        mode,
        *flags,
    ]
    return [str(MLX_LAUNCH), "-n", "2", "--backend", "ring", "--", *serve]


def rank_pids(log: Path) -> dict[int, int]:
    """Each rank's pid, from the distributed startup line.

    Args:
        log: The launcher's output.

    Returns:
        ``{rank: pid}``.
    """
    text = log.read_text(errors="replace")
    return {int(r): int(p) for r, p in re.findall(r"rank (\d+) [^;]*?\(pid (\d+)\)", text)}


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory) -> Callable[[str], Path]:
    """A tiny checkpoint of a family with a tokenizer, built once per session."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = family_checkpoint(family, tmp_path_factory.mktemp(family))
        return built[family]

    return get


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start two-rank servers (or, with mode None, one process); all stop at the end."""
    started: list[ServerProcess] = []

    def start(model: Path, mode: str | None, *flags: str) -> ServerProcess:
        port = free_port()
        if mode is None:
            cmd = [sys.executable, "-m", "moeserve.server.cli", "serve", "--model", str(model)]
            cmd += [
                "--port",
                str(port),
                "--max-model-len",
                "512",
                "--served-model-name",
                "m",
                *flags,
            ]
        else:
            cmd = distributed_command(model, port, mode, *flags)
        log = tmp_path / f"server-{mode}-{port}.log"
        env = {"MOESERVE_CACHE_DIR": str(tmp_path / "cache")}
        proc = ServerProcess.start(
            cmd, port, "/health", log, env=env, timeout=240, cwd=REPO, stdin=subprocess.PIPE
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
