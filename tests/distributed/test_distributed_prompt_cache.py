"""Two ranks with ``--prompt-cache-dir``: each rank's part of a session on disk (issue 17).

A two-rank pipeline server over a hybrid model (Qwen3-Next: linear-attention layers, whose
state is saved at turn boundaries, on both ranks) answers the first turn of two sessions and
is stopped; each rank has written its part of each session under the same file name in its
own directory. One part of rank 1 is then deleted. Started again on the same directory, the
server answers the session whose parts are all there from disk (``cached_tokens > 0``) and the
other one as a miss (recomputed, not an error), both exactly as one process answers them.
Rank 0 lists the two sessions once each (not rank 1's files), and deleting a session through
the admin route deletes every rank's part.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from moeserve.server.engine.prompt_cache_disk import read_metadata

pytestmark = pytest.mark.slow

FAMILY, MODE = "qwen3_next", "pipeline"
SESSIONS = ("a", "b")


def _messages(session: str, reply: str | None = None) -> list[dict[str, str]]:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Tell me about the place called {session}."},
    ]
    if reply is not None:
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    return messages


def _turn(url: str, session: str, reply: str | None = None) -> tuple[str, int]:
    """One chat turn of a session: its text and its cached prompt tokens."""
    body = {"model": "m", "messages": _messages(session, reply), "max_tokens": 6}
    body |= {"temperature": 0, "prompt_cache_key": session}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = r.json()
    cached = got["usage"]["prompt_tokens_details"]["cached_tokens"]
    return got["choices"][0]["message"]["content"], cached


def _parts(directory: Path) -> dict[str, Path]:
    """The session files of one rank's directory, by file name."""
    return {p.name: p for p in directory.glob("*.safetensors") if not p.name.startswith(".")}


def _wait(condition: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_sessions_survive_a_restart_with_each_ranks_part(family_dir, launch, tmp_path) -> None:
    model = family_dir(FAMILY)
    sessions = tmp_path / "sessions"
    rank0, rank1 = (sessions / f"{MODE}-rank{r}-of-2" for r in (0, 1))
    with ThreadPoolExecutor(1) as pool:  # the two ranks start while one process answers
        starting = pool.submit(launch, model, MODE, "--prompt-cache-dir", str(sessions))
        single = launch(model, None)
        url = single.base_url.removesuffix("/v1")
        want = {}
        for s in SESSIONS:
            first, _ = _turn(url, s)
            want[s] = (first, _turn(url, s, first)[0])
        single.stop()
        served = starting.result()

    url = served.base_url.removesuffix("/v1")
    assert [_turn(url, s)[0] for s in SESSIONS] == [want[s][0] for s in SESSIONS]
    _wait(
        lambda: len(_parts(rank0)) == 2 and _parts(rank1).keys() == _parts(rank0).keys(),
        "every rank should write its part of both sessions under the same names",
    )
    served.stop()

    # Which file is whose: rank 0's files name their session in their metadata.
    names = {read_metadata(p)[0]["session"]: name for name, p in _parts(rank0).items()}
    (rank1 / names["b"]).unlink()

    served = launch(model, MODE, "--prompt-cache-dir", str(sessions))
    url = served.base_url.removesuffix("/v1")
    listed = httpx.get(url + "/v1/sessions", timeout=30).json()["data"]
    assert sorted(row["key"] for row in listed) == ["a", "b"]  # never rank 1's files
    text, cached = _turn(url, "a", want["a"][0])
    assert (text, cached > 0) == (want["a"][1], True), "a's parts are all on disk: a hit"
    text, cached = _turn(url, "b", want["b"][0])
    assert (text, cached) == (want["b"][1], 0), "rank 1 lost its part of b: a miss"

    assert httpx.delete(url + "/v1/sessions/a", timeout=30).status_code == 200
    _wait(
        lambda: names["a"] not in _parts(rank0) | _parts(rank1),
        "deleting a session deletes every rank's part",
    )
    assert names["b"] in _parts(rank0) and names["b"] in _parts(rank1)  # b's new turn saved
