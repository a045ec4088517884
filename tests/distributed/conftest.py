"""Two ranks of ``moeserve serve --distributed`` under ``mlx.launch`` on loopback.

``launch(model_dir, mode, *flags)`` runs ``mlx.launch -n 2 --backend ring -- python -m
moeserve.server.cli serve ...`` in its own process group (through ``bench/serverproc.py``),
waits for rank 0's ``/health``, and stops every rank at the end of the test. The ranks' pids
come from the startup line each rank logs (``bench.serverproc.rank_pids``).

The launcher gets ``bench.serverproc.launcher_stdin`` as its standard input, without which it
takes most of a core.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.serverproc import ServerProcess, free_port, launcher_stdin
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
    serve = [*single_command(model, port), "--distributed", mode, *flags]
    return [str(MLX_LAUNCH), "-n", "2", "--backend", "ring", "--", *serve]


def single_command(model: Path, port: int, *flags: str) -> list[str]:
    """The command line of a one-process server.

    Args:
        model: Model directory.
        port: Its port.
        *flags: Extra ``serve`` flags.

    Returns:
        The argv.
    """
    serve = [sys.executable, "-m", "moeserve.server.cli", "serve", "--model", str(model)]
    return [*serve, "--port", str(port), *COMMON_FLAGS, *flags]


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
    started: list[tuple[ServerProcess, Callable[[], None]]] = []

    def start(model: Path, mode: str | None, *flags: str) -> ServerProcess:
        port = free_port()
        log = tmp_path / f"server-{mode}-{port}.log"
        env = {"MOESERVE_CACHE_DIR": str(tmp_path / "cache")}
        if mode is None:
            cmd = single_command(model, port, *flags)
            stdin, close = subprocess.PIPE, lambda: None
        else:
            cmd = distributed_command(model, port, mode, *flags)
            stdin, close = launcher_stdin()
        try:
            proc = ServerProcess.start(
                cmd, port, "/health", log, env=env, timeout=240, cwd=REPO, stdin=stdin
            )
        except BaseException:
            close()
            raise
        finally:
            if mode is not None:
                os.close(stdin)  # the launcher has its own copy
        started.append((proc, close))
        return proc

    yield start
    for proc, close in started:
        proc.stop()
        close()
