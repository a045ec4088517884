"""The README's examples, run as written against a live demo server (what ``make run`` serves).

The code blocks are read out of README.md. The Python blocks run in order in one namespace, as
a reader pastes them (later blocks use the ``client`` and ``tools`` of earlier ones), with the
real ``openai`` and ``anthropic`` packages; the curl block runs in bash, the demo
``moeserve generate`` line with this environment's moeserve. Only the server's address is
changed. Then the Python blocks run again greedily (every request sent with
``temperature: 0``), where a small model is likeliest to write until the context is full:
bounded by their own ``max_tokens`` and schemas, each must still end well, in seconds.

The README's ``docker run`` lines cannot run here; they are checked to use ``--init``, as the
Dockerfile's own comments do.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from tests.live import LiveServer

ROOT = Path(__file__).resolve().parents[2]
README_URL = "http://127.0.0.1:8000"
# Seconds a block may take; bounded, each takes well under one on the demo model.
BLOCK_SECONDS = 15.0


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks in one language, in order (indented ones too).

    Args:
        language: The fence's info string, e.g. ``python``.

    Returns:
        Each block's text, its indentation removed.
    """
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    fence = re.compile(rf"^( *)```{language}\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)
    blocks = []
    for indent, body in fence.findall(text):
        blocks.append("".join(line.removeprefix(indent) for line in body.splitlines(True)))
    return blocks


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``moeserve serve`` with no model: the demo model, built into a fresh cache."""
    live = LiveServer.start(None, log_dir=tmp_path_factory.mktemp("readme"))
    yield live
    live.stop()


class Greedy(httpx.HTTPTransport):
    """Sends every JSON request with ``temperature: 0``, whatever the code asked for."""

    sent = 0  # requests rewritten

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("content-type") == "application/json":
            body = {**json.loads(request.read()), "temperature": 0}
            self.sent += 1
            headers = {k: v for k, v in request.headers.items() if k != "content-length"}
            request = httpx.Request(request.method, request.url, headers=headers, json=body)
        return super().handle_request(request)


class GreedyAnthropic(httpx2.HTTPTransport):
    """``Greedy`` for the ``anthropic`` package, which sends its requests with httpx2."""

    sent = 0  # requests rewritten

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.headers.get("content-type") == "application/json":
            body = {**json.loads(request.read()), "temperature": 0}
            self.sent += 1
            headers = {k: v for k, v in request.headers.items() if k != "content-length"}
            request = httpx2.Request(request.method, request.url, headers=headers, json=body)
        return super().handle_request(request)


def run_python_blocks(demo: LiveServer) -> dict[str, Any]:
    """Run every Python block in one namespace, each against the clock.

    Args:
        demo: The server the blocks are pointed at.

    Returns:
        The namespace, with each block's printed output under ``printed``.
    """
    blocks = code_blocks("python")
    assert len(blocks) >= 4 and README_URL in blocks[0]  # the first one makes the client
    namespace: dict[str, Any] = {"__name__": "readme", "printed": []}
    for block in blocks:
        out = io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stdout(out):
            exec(compile(block.replace(README_URL, demo.url), "README.md", "exec"), namespace)
        elapsed = time.monotonic() - start
        assert elapsed < BLOCK_SECONDS, f"{elapsed:.1f} s:\n{block}"
        namespace["printed"].append(out.getvalue())
    return namespace


def check_results(namespace: dict[str, Any]) -> None:
    """What the blocks left behind: a stream, a tool call, a parsed object, a chat answer."""
    stream_out, tool_out, parsed_out = namespace["printed"][:3]
    assert "CompletionUsage(" in stream_out  # the stream's last chunk, with usage
    arguments = json.loads(tool_out)
    assert set(arguments) == {"city"} and len(arguments["city"]) <= 32
    assert re.match(r"name='.*' population=\d+$", parsed_out.strip(), re.DOTALL)
    assert namespace["r"].choices[0].message.content is not None  # the last block's answer
    assert namespace["message"].stop_reason in ("end_turn", "max_tokens")  # Anthropic's API


def test_python_examples_as_written(demo: LiveServer) -> None:
    check_results(run_python_blocks(demo))


def test_python_examples_greedy(demo: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real, greedy = openai.OpenAI, Greedy()

    def greedy_client(**kwargs: Any) -> openai.OpenAI:
        return real(**kwargs, http_client=httpx.Client(transport=greedy))

    real_claude, greedy_claude = anthropic.Anthropic, GreedyAnthropic()

    def greedy_anthropic(**kwargs: Any) -> anthropic.Anthropic:
        return real_claude(**kwargs, http_client=httpx2.Client(transport=greedy_claude))

    # The blocks import OpenAI (and Anthropic) from the package, so they get these.
    monkeypatch.setattr(openai, "OpenAI", greedy_client)
    monkeypatch.setattr(anthropic, "Anthropic", greedy_anthropic)
    check_results(run_python_blocks(demo))
    # One request per block.
    assert greedy.sent + greedy_claude.sent == len(code_blocks("python"))


def test_curl_example(demo: LiveServer) -> None:
    if shutil.which("curl") is None:
        pytest.skip("no curl")
    [block] = [b for b in code_blocks("bash") if b.startswith("curl ")]
    run = subprocess.run(
        ["bash", "-c", block.replace(README_URL, demo.url)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body = json.loads(run.stdout)
    assert body["model"] == "moeserve-demo" and body["usage"]["completion_tokens"] <= 32


def test_generate_example() -> None:
    lines = [line for block in code_blocks("bash") for line in block.splitlines()]
    [line] = [x for x in lines if "moeserve generate" in x and x.endswith("# demo model")]
    argv = shlex.split(line, comments=True)
    assert argv[0] == ".venv/bin/moeserve"
    # This environment's moeserve (after `make`, .venv's), with its interpreter.
    run = subprocess.run(
        [sys.executable, "-m", "moeserve.server.cli", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    assert "generated " in run.stderr and "tokens/s" in run.stderr


def test_docker_run_lines_use_init() -> None:
    documented = [
        line
        for text in ((ROOT / "README.md").read_text(), (ROOT / "Dockerfile.macos").read_text())
        for line in text.splitlines()
        if "docker run" in line
    ]
    assert len(documented) >= 4
    for line in documented:
        assert "docker run --rm --init " in line, line
