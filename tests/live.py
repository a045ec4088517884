"""A live moeserve on a loopback port, for integration and client-compatibility tests.

``LiveServer.start(model_dir, *flags)`` runs ``python -m moeserve.server.cli serve`` in a subprocess
on a free 127.0.0.1 port (through ``bench/serverproc.py``, the benchmarks' launcher), waits
for ``/health`` to answer 200, and ``stop()`` ends it. Output goes to a log file that failing
tests can print.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.serverproc import ServerProcess, free_port, moeserve_command

__all__ = ["LiveServer", "free_port"]


@dataclass
class LiveServer:
    """A running server process."""

    proc: ServerProcess

    @property
    def port(self) -> int:
        """Its port."""
        return self.proc.port

    @property
    def process(self):
        """The ``subprocess.Popen``."""
        return self.proc.process

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``.../v1``."""
        return self.url + "/v1"

    @classmethod
    def start(
        cls,
        model_dir: Path | None,
        *flags: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> LiveServer:
        """Start a server and wait until it is healthy.

        Args:
            model_dir: The model to serve; None serves the demo model, built into the
                server's own cache directory.
            *flags: Extra ``moeserve serve`` flags.
            log_dir: Where the server's output goes.
            env: Extra environment variables.
            timeout: Seconds to wait for health.

        Returns:
            The running server.
        """
        port = free_port()
        full_env = {"MOESERVE_CACHE_DIR": str(log_dir / "cache"), **(env or {})}
        cmd = moeserve_command(model_dir, port, *flags)
        proc = ServerProcess.start(
            cmd,
            port,
            "/health",
            log_dir / f"server-{port}.log",
            env=full_env,
            timeout=timeout,
            cwd=Path(__file__).resolve().parents[1],
        )
        return cls(proc)

    def output(self) -> str:
        """The server's output so far."""
        log = self.proc.log
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        """Terminate the server (and anything it started)."""
        self.proc.stop()
