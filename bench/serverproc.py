"""Start and stop a server process on a loopback port for benchmarks.

Knows how to pick a free port, wait for readiness on an HTTP path, read a process's peak
resident memory, and stop the process group; gives ``mlx.launch`` a standard input it does
not spin on, and reads the ranks' pids from a distributed server's log. Used by the benches
that start servers and by the two-rank tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Returns:
        The port.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        """The OpenAI base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    @classmethod
    def start(
        cls,
        cmd: list[str],
        port: int,
        ready_path: str,
        log: Path,
        env: dict[str, str] | None = None,
        timeout: float = 300.0,
        cwd: Path | None = None,
        stdin: int | None = None,
    ) -> ServerProcess:
        """Run ``cmd`` and wait until ``GET ready_path`` answers 200.

        Args:
            cmd: The command line (must bind 127.0.0.1:``port``).
            port: Its port.
            ready_path: A path that answers 200 once the server serves.
            log: File for its output.
            env: Extra environment variables.
            timeout: Seconds to wait.
            cwd: Working directory (default: the current one).
            stdin: Its standard input (``subprocess.PIPE``: one that stays open and empty;
                ``mlx.launch`` polls a closed one in a busy loop); default: inherited.

        Returns:
            The process.
        """
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                stdin=stdin,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        server = cls(proc, port, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited early:\n{log.read_text(errors='replace')}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        server.stop()
        raise RuntimeError(f"{cmd[0]} not ready after {timeout}s; see {log}")

    def peak_rss_bytes(self) -> int:
        """Peak resident set size of the server process (Linux: VmHWM; else current RSS).

        Returns:
            Bytes, or 0 when unknown.
        """
        status = Path(f"/proc/{self.process.pid}/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(self.process.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return int(out) * 1024 if out else 0

    def stop(self) -> None:
        """Terminate the process group, then kill it if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def moeserve_command(model: Path | None, port: int, *flags: str) -> list[str]:
    """The command line of a moeserve server in this interpreter's environment.

    Args:
        model: Model directory; None serves the demo model (built on first use).
        port: Port.
        *flags: Extra ``serve`` flags.

    Returns:
        The argv.
    """
    return [
        sys.executable,
        "-m",
        "moeserve.server.cli",
        "serve",
        *(["--model", str(model)] if model is not None else []),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        *flags,
    ]


# Bytes that fill both ranks' input pipes (64 KiB each on Linux) with room to spare.
STDIN_FILL = 1 << 18


def launcher_stdin() -> tuple[int, Callable[[], None]]:
    """A standard input for ``mlx.launch`` that keeps it from spinning.

    ``mlx.launch`` (0.32) polls its own standard input and each rank's in loops that never
    sleep while either is ready: a closed input is always readable, and a rank's input pipe
    always writable. So the launcher gets a pipe that stays open and first carries
    ``STDIN_FILL`` bytes, which it forwards until each rank's pipe is full (ranks never read
    it); from then on its loops sleep. Without this the launcher takes most of a core
    (measured: 2 of 3 s idle), a third of this machine's two.

    Returns:
        The pipe's read end (for ``Popen``; close it here once started) and a function that
        closes the write end (call it after the launcher stopped).
    """
    read, write = os.pipe()

    def fill() -> None:
        with contextlib.suppress(OSError):  # the launcher is gone
            os.write(write, b"\n" * STDIN_FILL)  # blocks until the launcher has taken it

    threading.Thread(target=fill, name="mlx-launch-stdin", daemon=True).start()
    return read, lambda: os.close(write)


def rank_pids(log: Path, ranks: int = 2, timeout: float = 30.0) -> dict[int, int]:
    """Each rank's pid, from the distributed startup line, waiting until every rank's shows.

    ``/health`` answers straight from rank 0's socket, but the ranks' output reaches the log
    through ``mlx.launch``'s relay loop, so on a loaded machine the startup line can land a
    moment after the server is up (CI once read an empty log here).

    Args:
        log: The launcher's output.
        ranks: How many ranks' pids to wait for.
        timeout: Seconds to wait for them.

    Returns:
        ``{rank: pid}`` (fewer than ``ranks`` entries only if the wait ran out; with
        ``timeout`` 0, whatever the log holds now).
    """
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        found = {int(r): int(p) for r, p in re.findall(r"rank (\d+) [^;]*?\(pid (\d+)\)", text)}
        if len(found) >= ranks or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
