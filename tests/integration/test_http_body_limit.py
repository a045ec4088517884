"""Big request bodies: a 413 before an oversized body is read, and nothing blocks the loop.

A live server (the module's default one: ``max_request_bytes`` 8 MiB, context 512 tokens)
is spoken to with httpx and with raw sockets that send the headers first and the body slowly,
as a real client on a slow link does: the 413 must arrive while the body is still being sent,
and arrive whole (a server that closes a socket holding unread input resets the connection,
and the client sees that instead). A second server with a 4 KiB limit checks the boundary.

Timing bounds here are generous: they tell "blocked for seconds" (tokenising megabytes on the
event loop) from "not blocked", nothing finer.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

CHAT = "/v1/chat/completions"
LIMIT = 8 * 1024 * 1024  # the default max_request_bytes
HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def _raw_request(headers: dict[str, str], path: str = CHAT) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _parse(raw: bytes) -> tuple[int, dict]:
    """Status and JSON body of one complete HTTP/1.1 response with a Content-Length."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    )
    assert len(body) == length, (len(body), length)
    return status, json.loads(body)


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def _send_slowly(port: int, head: bytes, pieces: Iterator[bytes], seconds: float) -> tuple:
    """Send ``head``, then ``pieces`` one by one, reading whatever the server answers meanwhile.

    Returns:
        (bytes of body sent when the answer was complete or the pieces ran out, the answer).
    """
    sent, answer = 0, b""
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(head)
        for piece in pieces:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
                if _complete(answer):
                    break
            if time.monotonic() > deadline:
                break
            sock.sendall(piece)
            sent += len(piece)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        while not _complete(answer):  # the pieces ran out: wait for the answer
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            answer += data
    return sent, answer


def _assert_413(status: int, body: dict, limit: int = LIMIT) -> None:
    assert status == 413, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert str(limit) in error["message"]


def test_oversized_content_length_is_refused_before_the_body(server) -> None:
    # Only the headers are sent: the answer cannot wait for a body.
    head = _raw_request({"Content-Length": str(LIMIT + 1)})
    _, answer = _send_slowly(server.port, head, iter(()), seconds=10)
    assert answer, "no answer to the headers alone"
    _assert_413(*_parse(answer))


def test_slow_oversized_body_gets_413_while_still_sending(server) -> None:
    total = 3 * LIMIT
    head = _raw_request({"Content-Length": str(total)})
    pieces = (b"x" * 65536 for _ in range(total // 65536))

    def slow() -> Iterator[bytes]:
        for piece in pieces:
            time.sleep(0.002)
            yield piece

    sent, answer = _send_slowly(server.port, head, slow(), seconds=30)
    _assert_413(*_parse(answer))
    assert sent < total  # answered while the client was still sending


def test_slow_chunked_body_gets_413_once_past_the_limit(server) -> None:
    head = _raw_request({"Transfer-Encoding": "chunked"})
    piece = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"  # 64 KiB chunks, never a last chunk

    def chunks() -> Iterator[bytes]:
        for _ in range(3 * LIMIT // 0x10000):
            time.sleep(0.002)
            yield piece

    sent, answer = _send_slowly(server.port, head, chunks(), seconds=30)
    _assert_413(*_parse(answer))
    # Answered soon after the limit, not at the end (there is no end: no last chunk).
    assert sent < LIMIT + 4 * 1024 * 1024, sent


def test_httpx_gets_the_413_not_a_dropped_connection(client: httpx.Client) -> None:
    body = b'{"model": "tiny", "padding": "' + b"x" * LIMIT + b'"}'
    r = client.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    _assert_413(r.status_code, r.json())

    def chunked() -> Iterator[bytes]:
        yield b'{"model": "tiny", "padding": "'
        for _ in range(LIMIT // 65536 + 2):
            yield b"x" * 65536

    r = client.post(CHAT, content=chunked(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers  # it went out chunked
    _assert_413(r.status_code, r.json())
    # The connection still serves: the rest of the body was read and dropped, not left over.
    assert client.get("/health").status_code == 200


@pytest.fixture(scope="module")
def small_limit(start_module_server):
    """A server that accepts bodies of at most 4096 bytes."""
    return start_module_server("--max-request-bytes", "4096", "--model-alias", "tiny")


def _body_of_size(size: int) -> bytes:
    """A valid chat request body of exactly ``size`` bytes (an ignored field pads it)."""
    empty = json.dumps({**HELLO, "padding": ""}).encode()
    return json.dumps({**HELLO, "padding": "x" * (size - len(empty))}).encode()


@pytest.mark.parametrize("size", [4096, 4097])
def test_the_limit_is_max_request_bytes_exactly(small_limit, size: int) -> None:
    body = _body_of_size(size)
    assert len(body) == size
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=small_limit.url, timeout=60) as http:
        r = http.post(CHAT, content=body, headers=headers)
    if size <= 4096:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        _assert_413(r.status_code, r.json(), limit=4096)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "x" * 3_000_000}]}, "messages"),
        ("/v1/completions", {"prompt": "word " * 600_000}, "prompt"),
    ],
)
def test_hopeless_prompt_is_refused_without_tokenising(client, path, body, param) -> None:
    start = time.monotonic()
    r = client.post(path, json={"model": "tiny", **body})
    elapsed = time.monotonic() - start
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == param
    # Measured in bytes, not tokens: the prompt was never tokenised (that takes seconds).
    assert "bytes long" in error["message"], error["message"]
    assert elapsed < 3.0, elapsed


def test_health_answers_while_a_big_body_is_tokenised(server, client) -> None:
    # 6 MB of text is 3.6M tokens: several seconds of tokenising, off the event loop.
    text = "hello world " * 500_000
    done: dict[str, object] = {}

    def tokenize() -> None:
        start = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=120) as http:
            r = http.post("/tokenize", json={"model": "tiny", "prompt": text})
        done["status"], done["tail"] = r.status_code, r.content[-60:]
        done["seconds"] = time.monotonic() - start

    worker = threading.Thread(target=tokenize)
    worker.start()
    slowest = 0.0
    with httpx.Client(base_url=server.url, timeout=60) as http:
        while worker.is_alive():
            start = time.monotonic()
            assert http.get("/health").status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.02)
    worker.join()
    assert done["status"] == 200
    count = int(re.search(rb'"count":(\d+)', done["tail"]).group(1))
    assert count > 1_000_000
    assert slowest < 1.5, f"/health took {slowest:.2f} s while /tokenize took {done['seconds']}"
