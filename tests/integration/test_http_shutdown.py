"""Graceful shutdown of a real ``moeserve serve`` process on SIGTERM and SIGINT.

Streams run when the signal arrives. With a drain window long enough they finish normally
(their last chunk, then ``[DONE]``); meanwhile ``/health`` says 503 ``draining`` and a new
request gets 503 ``shutting_down``; once they are done the process exits, and a connection
is refused from then on (the socket closes with uvicorn's shutdown: that, not a 503, is what
a client sees after the drain). With a one-second window the streams end with an error event
and then ``[DONE]``, a non-streaming request gets the 503, and the process exits.

The demo model writes a few hundred tokens a second per stream here, so 1500-token streams
outlast the checks made during the drain by seconds.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.integration.conftest import parse_sse

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Tell me a long story."}]
LONG = {"model": "tiny", "messages": USER, "max_tokens": 3000, "ignore_eos": True}
# Long enough to outlast the checks made during the drain, short enough to wait for.
MEDIUM = {**LONG, "max_tokens": 1500}


class Stream(threading.Thread):
    """A streaming chat request read in a thread; ``started`` is set at its first event."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.started = url, body, threading.Event()
        self.raw, self.error = b"", None

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.url, timeout=120) as http,
                http.stream("POST", CHAT, json={**self.body, "stream": True}) as r,
            ):
                assert r.status_code == 200
                for piece in r.iter_raw():
                    self.raw += piece
                    if b"data: " in self.raw:
                        self.started.set()
        except Exception as e:  # reported by the test, not lost in the thread
            self.error = e
        self.started.set()

    def payloads(self) -> list[str]:
        """The ``data:`` payloads, the SSE framing checked."""
        self.join(120)
        assert self.error is None, f"the stream broke: {self.error!r}"
        return parse_sse(self.raw)


def _start_streams(server: Any, count: int, body: dict[str, Any]) -> list[Stream]:
    streams = [Stream(server.url, body) for _ in range(count)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(60)
    return streams


def _assert_exits(server: Any, sig: int) -> None:
    """The process ends, by the signal or with status 0.

    uvicorn re-raises the signal after its shutdown: SIGTERM's default action kills the
    process, SIGINT's KeyboardInterrupt is the normal end of ``serve`` (status 0).
    """
    code = server.process.wait(60)
    assert code == (-sig if sig == signal.SIGTERM else 0), server.output()[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_streams_finish_within_the_drain_window(start_server, sig) -> None:
    server = start_server(
        "--model-alias", "tiny", "--max-model-len", "4096", "--shutdown-drain-seconds", "120"
    )
    streams = _start_streams(server, 3, MEDIUM)
    server.process.send_signal(sig)
    time.sleep(0.3)  # the signal is handled between two ticks of uvicorn's loop

    with httpx.Client(base_url=server.url, timeout=30) as http:
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "draining"}
        r = http.post(CHAT, json={"model": "tiny", "messages": USER, "max_tokens": 2})
        assert r.status_code == 503
        assert r.headers["connection"] == "close"
        error = r.json()["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error"

    assert any(s.is_alive() for s in streams), "the streams ended before the drain was checked"
    for stream in streams:
        payloads = stream.payloads()
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    _assert_exits(server, sig)
    assert "draining" in server.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_streams_past_the_deadline_end_with_an_error_then_done(start_server, sig) -> None:
    server = start_server(
        "--model-alias", "tiny", "--max-model-len", "4096", "--shutdown-drain-seconds", "1"
    )
    answer: dict[str, httpx.Response] = {}

    def non_streaming() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            answer["r"] = http.post(CHAT, json=LONG)

    waiting = threading.Thread(target=non_streaming, daemon=True)
    waiting.start()
    streams = _start_streams(server, 2, LONG)
    server.process.send_signal(sig)

    for stream in streams:
        payloads = stream.payloads()
        assert payloads[-1] == "[DONE]", payloads[-3:]
        *content, farewell = [json.loads(p) for p in payloads[:-1]]
        assert content and not any("error" in c for c in content)
        assert farewell["error"]["code"] == "shutting_down"
        assert set(farewell["error"]) == {"message", "type", "param", "code"}
    waiting.join(60)
    assert answer["r"].status_code == 503, answer["r"].text
    assert answer["r"].json()["error"]["code"] == "shutting_down"
    _assert_exits(server, sig)
