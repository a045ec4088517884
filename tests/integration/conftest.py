"""Fixtures for tests against a live server: a tiny demo checkpoint and a running moeserve.

Two kinds of server: ``LiveServer`` subprocesses started through the real command line
(``server``, ``start_server``, ``start_module_server``), and ``inprocess_server``, which runs
``create_app(settings, runtime_factory)`` under a real uvicorn on a loopback port in a thread,
for the few behaviours that need a runtime the command line cannot build (an engine whose
model fails, an engine with a prompt cache). Both are spoken to over raw HTTP with httpx.

``sse`` parses a server-sent-events body byte for byte and checks its framing.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.live import LiveServer, free_port

API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    """An httpx client for the module's ``server``."""
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def start_module_server(tiny_model: Path, tmp_path_factory) -> Iterator:
    """Like ``start_server``, but the servers live until the end of the test module."""
    started: list[LiveServer] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> LiveServer:
        log_dir = tmp_path_factory.mktemp("module-server")
        live = LiveServer.start(tiny_model, *flags, log_dir=log_dir, env=env)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


# ----- server-sent events ---------------------------------------------------------------------


def parse_sse(raw: bytes) -> list[str]:
    """Split an SSE body into its ``data:`` payloads, asserting the framing on the way.

    Every event is exactly one ``data: `` line (comment lines such as keepalives aside) and
    ends with a blank line; the body ends right after the last event's blank line.

    Args:
        raw: The response body as received.

    Returns:
        The payloads in order.
    """
    text = re.sub(r"\r\n|\r", "\n", raw.decode("utf-8"))
    assert text.endswith("\n\n"), f"the stream does not end with a blank line: {text[-80:]!r}"
    blocks = text[:-2].split("\n\n")
    payloads = []
    for block in blocks:
        assert block, "two blank lines in a row"
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue  # a keepalive comment
        assert len(lines) == 1, f"an event with more than one field line: {block!r}"
        assert lines[0].startswith("data: "), f"not a data line: {lines[0]!r}"
        payloads.append(lines[0][len("data: ") :])
    return payloads


def sse_chunks(
    http: httpx.Client, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """POST a streaming request and return its JSON chunks, checked to end with ``[DONE]``.

    Args:
        http: The client.
        path: The route.
        body: The request body (``stream`` is set here).
        headers: Extra request headers.

    Returns:
        Every chunk before ``data: [DONE]``, parsed.
    """
    with http.stream("POST", path, json={**body, "stream": True}, headers=headers) as r:
        raw = r.read()
        assert r.status_code == 200, raw
        assert r.headers["content-type"].startswith("text/event-stream")
    payloads = parse_sse(raw)
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


@pytest.fixture(scope="session")
def sse() -> Callable[..., list[dict[str, Any]]]:
    """``sse(client, path, body, headers=None)``: see ``sse_chunks``."""
    return sse_chunks


@pytest.fixture(scope="session")
def sse_payloads() -> Callable[[bytes], list[str]]:
    """``sse_payloads(raw)``: see ``parse_sse``."""
    return parse_sse


# ----- in-process servers ---------------------------------------------------------------------


class InProcessServer:
    """A ``create_app`` application under uvicorn on a loopback port, in a daemon thread.

    Args:
        app: The ASGI application.
    """

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> InProcessServer:
        """Start serving and wait until uvicorn is up (the lifespan has built the runtime)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit (which runs the lifespan's shutdown) and wait for it."""
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def inprocess_server() -> Iterator[Callable[..., InProcessServer]]:
    """``inprocess_server(settings, runtime_factory)`` starts an app; all stop with the module."""
    started: list[InProcessServer] = []

    def start(settings: Any, runtime_factory: Callable[[Any], Any]) -> InProcessServer:
        from moeserve.server.http.app import create_app

        live = InProcessServer(create_app(settings, runtime_factory)).start()
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()
