"""Starting the real server: the summary line, settings precedence, and refusing bad settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def test_startup_prints_one_summary_line(start_server) -> None:
    live = start_server("--model-alias", "tiny")
    lines = [line for line in live.output().splitlines() if "serving " in line]
    assert len(lines) == 1
    line = lines[0]
    for part in ("qwen2_moe", "parameters", "float32", "MiB", "BLAS", f"{live.base_url}"):
        assert part in line, (part, line)


def test_environment_overrides_the_config_file_and_flags_override_both(start_server) -> None:
    live = start_server(
        "--served-model-name",
        "from-flag",
        env={"MOESERVE_SERVED_MODEL_NAME": "from-env", "MOESERVE_MODEL_ALIASES": "env-alias"},
    )
    ids = [m["id"] for m in httpx.get(live.base_url + "/models").json()["data"]]
    assert ids == ["from-flag", "env-alias"]


def test_bad_setting_fails_at_startup_naming_it(tiny_model) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeserve.server.cli",
            "serve",
            "--model",
            str(tiny_model),
            "--prefill-chunk",
            "4096",
            "--max-batched-tokens",
            "1024",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "prefill_chunk" in result.stderr and "max_batched_tokens" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_terminal_sees_a_progress_bar_while_weights_load(tiny_model, tmp_path) -> None:
    import fcntl
    import os
    import select
    import signal
    import struct
    import termios
    import time

    from tests.live import free_port

    primary, secondary = os.openpty()  # the bar is shown on terminals only, as tqdm decides
    # A new pty is 0 columns wide, where tqdm draws nothing: give it a real window size.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {**os.environ, "MOESERVE_CACHE_DIR": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "moeserve.server.cli",
        "serve",
        "--model",
        str(tiny_model),
        "--port",
        str(free_port()),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        start_new_session=True,
    )
    os.close(secondary)
    seen, deadline = b"", time.monotonic() + 60
    try:
        while b"serving " not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(primary, 65536)
                except OSError:
                    break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        os.close(primary)
    text = seen.decode(errors="replace")
    assert "loading weights" in text and "serving " in text
    assert text.index("loading weights") < text.index("serving ")
