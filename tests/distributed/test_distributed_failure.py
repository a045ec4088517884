"""A rank that dies or hangs mid-stream ends the stream with an error, and rank 0 stops.

Two ranks serve a tiny model in pipeline mode. Killing rank 1 closes its sockets, so rank
0's next hand-off fails at once; stopping it (SIGSTOP) leaves them open and silent, so only
the collective watchdog (``--distributed-timeout-seconds``) can notice. Either way the client
gets an error event and ``[DONE]``, ``/health`` stops answering ok, and rank 0 exits within
30 s. Rank 1 listens on no port but the ones of the ring that ``mlx.launch`` gave it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from bench.serverproc import rank_pids

pytestmark = pytest.mark.slow


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (Linux: its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _ring_ports(pid: int) -> set[int]:
    """The ports of every rank in the hostfile mlx.launch handed this rank."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    hostfile = next(e.split(b"=", 1)[1] for e in env if e.startswith(b"MLX_HOSTFILE="))
    hosts = json.loads(Path(hostfile.decode()).read_text())
    return {int(a.rsplit(":", 1)[1]) for h in hosts for a in (h if isinstance(h, list) else [h])}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by mlx.launch) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _stream_until_failure(url: str, fail) -> tuple[list[str], float]:
    """Stream a long completion, call ``fail()`` after a few chunks; return the lines after."""
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    body |= {"temperature": 0, "ignore_eos": True}
    lines, chunks, failed_at = [], 0, 0.0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            chunks += 1
            if chunks == 3:
                fail()
                failed_at = time.monotonic()
            elif chunks > 3:
                lines.append(line)
    return lines, failed_at


def _check_failure(url: str, lines: list[str], rank0: int, failed_at: float) -> None:
    assert lines[-1] == "data: [DONE]"
    errors = [json.loads(x[6:]) for x in lines[:-1] if '"error"' in x]
    assert errors and errors[-1]["error"]["type"] == "server_error"
    deadline = failed_at + 30
    while _alive(rank0) and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):  # not answering at all is "not ok" too
            assert httpx.get(url + "/health", timeout=2).status_code != 200
        time.sleep(0.5)
    assert not _alive(rank0), "rank 0 did not exit within 30 s of the failure"


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_rank1_failure_mid_stream(how: str, family_dir, launch) -> None:
    server = launch(family_dir("qwen2_moe"), "pipeline", "--distributed-timeout-seconds", "8")
    url = server.base_url.removesuffix("/v1")
    pids = rank_pids(server.log)
    assert set(pids) == {0, 1}, server.log.read_text(errors="replace")[-4000:]
    assert _listening_ports(pids[1]) <= _ring_ports(pids[1])  # no HTTP port on rank 1
    assert server.port in _listening_ports(pids[0])
    sig = signal.SIGKILL if how == "kill" else signal.SIGSTOP
    try:
        lines, failed_at = _stream_until_failure(url, lambda: os.kill(pids[1], sig))
        _check_failure(url, lines, pids[0], failed_at)
    finally:
        if how == "hang" and _alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (Linux: /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_ranks_sleep_instead_of_spinning(family_dir, launch) -> None:
    """After a request, neither rank burns a core while the server waits for the next.

    MLX's ring collective polls its sockets, so a rank left waiting in the step broadcast
    used a whole core for as long as the server was idle; the doorbell lets it sleep.
    """
    server = launch(family_dir("qwen2_moe"), "pipeline")
    url = server.base_url.removesuffix("/v1")
    pids = rank_pids(server.log)
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    time.sleep(1.0)  # the idle ping has gone out
    before = {rank: _cpu_seconds(pid) for rank, pid in pids.items()}
    window = 4.0
    time.sleep(window)
    used = {rank: _cpu_seconds(pid) - before[rank] for rank, pid in pids.items()}
    assert all(u < 0.25 * window for u in used.values()), used  # spinning is ~1 s a second
    # And the next request wakes them as before.
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
