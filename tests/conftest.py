"""Test session setup shared by every directory.

``MOESERVE_CACHE_DIR`` points at a temporary directory for the whole session (removed at the
end), so that the demo model and the compiled BLAS shim never land in the user's
``~/.cache/moeserve``; server subprocesses inherit it. Importing ``models`` next lets it
choose the BLAS before any test module imports mlx.core.
The live-server fixtures (a tiny seeded checkpoint and moeserve subprocesses on loopback
ports) serve both ``tests/integration`` and ``tests/compat``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before `import moeserve.models`: importing it may compile the BLAS shim into the cache.
CACHE_DIR = tempfile.mkdtemp(prefix="moeserve-test-cache-")
os.environ["MOESERVE_CACHE_DIR"] = CACHE_DIR

import moeserve.models  # noqa: E402, F401
from moeserve.devtools.demo import CheckpointSpec, build_checkpoint  # noqa: E402
from tests.live import LiveServer  # noqa: E402


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's cache directory."""
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A seeded tiny Qwen2-MoE with its tokenizer (built once per test session)."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-model"), CheckpointSpec(seed=5))


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory) -> Iterator[LiveServer]:
    """A server with default settings plus an alias, shared by a test module."""
    live = LiveServer.start(
        tiny_model,
        "--model-alias",
        "tiny",
        "--max-model-len",
        "512",
        log_dir=tmp_path_factory.mktemp("server"),
    )
    yield live
    live.stop()


@pytest.fixture
def start_server(tiny_model: Path, tmp_path: Path) -> Iterator:
    """Start servers with custom flags; all are stopped at the end of the test."""
    started: list[LiveServer] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> LiveServer:
        live = LiveServer.start(tiny_model, *flags, log_dir=tmp_path, env=env)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()
