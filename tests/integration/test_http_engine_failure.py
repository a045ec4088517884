"""A generation engine that dies: the error reaches clients in OpenAI's shape, nothing hangs.

There is no honest way to break the engine of a ``moeserve serve`` subprocess from outside:
weights are fully read and checked at load, and the server has (rightly) no hook to kill its
engine. So these tests build the real application with ``create_app(settings, factory)``
where the factory puts the real tiny model, wrapped to raise on its N-th forward pass, inside
a real ``Engine``, and serve it with a real uvicorn on a loopback port (``inprocess_server``).
Everything from the engine thread outwards is the production code, spoken to over raw HTTP.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from moeserve.server.engine.engine import Engine
from moeserve.server.http.deps import Runtime
from moeserve.server.http.metrics import Metrics
from moeserve.server.settings import load_settings
from moeserve.server.startup import load_served_model

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]


class FailingModel:
    """The real model, except that forward pass number ``fail_at`` raises (and all after it).

    Args:
        model: The loaded model.
        fail_at: 1-based index of the first failing call.
    """

    def __init__(self, model: Any, fail_at: int) -> None:
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def __call__(self, tokens: Any, cache: Any = None, last_only: bool = False) -> Any:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("simulated device fault")
        return self.model(tokens, cache=cache, last_only=last_only)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)  # make_cache, layers, ...


def _factory(fail_at: int):
    def build(settings) -> Runtime:
        served = load_served_model(settings)
        model = FailingModel(served.loaded.model, fail_at)
        engine = Engine(model, served.tokenizer, settings.scheduler_config(served.max_model_len))
        engine.start()
        return Runtime(
            model_id=served.model_id,
            aliases=list(served.aliases),
            tokenizer=served.tokenizer,
            engine=engine,
            max_model_len=served.max_model_len,
            created=int(time.time()),
            settings=settings,
            metrics=Metrics(engine.stats),
        )

    return build


@pytest.fixture(scope="module")
def failing(inprocess_server, tiny_model):
    """``failing(fail_at)``: an httpx client for a fresh app whose model fails at that call."""
    settings = load_settings(
        model=str(tiny_model), model_aliases=["tiny"], max_model_len=512, prompt_cache=False
    )
    clients = []

    def start(fail_at: int) -> httpx.Client:
        live = inprocess_server(settings, _factory(fail_at))
        clients.append(httpx.Client(base_url=live.url, timeout=30))
        return clients[-1]

    yield start
    for c in clients:
        c.close()


def _assert_envelope(error: dict, code: str) -> None:
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    assert error["code"] == code
    assert "simulated device fault" in error["message"] or code == "engine_unavailable"


def _assert_engine_down(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "engine_dead"
    for path, body in ((CHAT, {"messages": USER}), ("/v1/completions", {"prompt": "hi"})):
        for stream in (False, True):
            r = client.post(path, json={"model": "tiny", "stream": stream, **body})
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/json")
            _assert_envelope(r.json()["error"], "engine_unavailable")


def _stream(client: httpx.Client, path: str, body: dict, sse_payloads) -> list[str]:
    with client.stream("POST", path, json={"model": "tiny", "stream": True, **body}) as r:
        assert r.status_code == 200
        raw = r.read()  # raises if the connection is not closed cleanly
    return sse_payloads(raw)


def _check_error_after_chunks(payloads: list[str], n_before: int) -> None:
    """Content first, then one error event, then [DONE] and nothing else.

    The ``openai`` package raises ``APIError`` at a ``data: {"error": ...}`` event; [DONE]
    after it ends the stream for clients that only watch for that.
    """
    assert payloads[-1] == "[DONE]", payloads[-2:]
    *chunks, last = payloads[:-1]
    assert len(chunks) >= n_before, payloads
    assert all("error" not in json.loads(c) for c in chunks)
    body = json.loads(last)
    assert set(body) == {"error"}
    _assert_envelope(body["error"], "generation_failed")


def test_chat_stream_error_mid_stream_then_503(failing, sse_payloads):
    client = failing(6)  # prefill + 4 decodes succeed: five tokens, then the fault
    body = {"messages": USER, "max_tokens": 50, "ignore_eos": True}
    payloads = _stream(client, CHAT, body, sse_payloads)
    _check_error_after_chunks(payloads, 1)
    first = json.loads(payloads[0])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    _assert_engine_down(client)


def test_completions_stream_error_mid_stream(failing, sse_payloads):
    client = failing(4)
    body = {"prompt": "Once upon", "max_tokens": 50, "ignore_eos": True}
    _check_error_after_chunks(_stream(client, "/v1/completions", body, sse_payloads), 1)
    _assert_engine_down(client)


def test_non_streaming_failure_is_500_then_503(failing):
    client = failing(3)
    body = {"model": "tiny", "messages": USER, "max_tokens": 20, "ignore_eos": True}
    r = client.post(CHAT, json=body)
    assert r.status_code == 500
    _assert_envelope(r.json()["error"], "generation_failed")
    _assert_engine_down(client)


def test_non_streaming_completions_failure_says_why(failing):
    client = failing(3)
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 20, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 500
    _assert_envelope(r.json()["error"], "generation_failed")  # the engine's message, as chat's
    _assert_engine_down(client)
