"""The KV byte budget on a live server: refusals, the default ``max_tokens``, preemption.

The server runs the demo model with ``--kv-cache-max-bytes`` set to 8 blocks: 128 positions
for all running sequences together. A request that could never fit gets a 400 in OpenAI's
shape naming the setting, and the server keeps serving; the same request without
``max_tokens`` gets a default cut to what fits. Eight concurrent streams that together need
several times the budget all complete, the engine preempts some of them (the metrics say
so), and greedy outputs match those of the same requests run one at a time: recomputing a
preempted sequence never changes what it says.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from moeserve.devtools.demo import CheckpointSpec
from moeserve.models.cache import BLOCK

CHAT = "/v1/chat/completions"
SPEC = CheckpointSpec()
# Keys and values of every layer, float32: what one position costs the demo model.
BYTES_PER_TOKEN = (
    SPEC.num_hidden_layers
    * 2
    * SPEC.num_key_value_heads
    * (SPEC.hidden_size // SPEC.num_attention_heads)
    * 4
)
BUDGET_TOKENS = 8 * BLOCK
BUDGET = BUDGET_TOKENS * BYTES_PER_TOKEN


@pytest.fixture(scope="module")
def live(start_module_server):
    """A server whose running sequences share 128 positions of KV cache."""
    return start_module_server(
        "--kv-cache-max-bytes",
        str(BUDGET),
        "--max-model-len",
        "512",
        "--max-running",
        "8",
        "--model-alias",
        "tiny",
    )


@pytest.fixture(scope="module")
def http(live) -> httpx.Client:
    with httpx.Client(base_url=live.url, timeout=60.0) as c:
        yield c


def _body(words: int, max_tokens: int | None, **extra: Any) -> dict[str, Any]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": " ".join(["hello world"] * words)}],
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def _metrics(http: httpx.Client) -> dict[str, float]:
    values = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_the_startup_line_and_health_name_the_budget(live, http) -> None:
    line = next(x for x in live.output().splitlines() if "serving " in x)
    assert "KV cache 0.1 MiB (2 full layers)" in line, line
    health = http.get("/health").json()
    assert health["kv_cache_max_bytes"] == BUDGET
    assert {"kv_cache_bytes", "kv_cache_tokens", "preemptions"} <= health.keys()


def test_a_request_that_can_never_fit_is_a_400_naming_the_setting(http) -> None:
    r = http.post(CHAT, json=_body(3, max_tokens=BUDGET_TOKENS + 16))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "max_tokens" and error["code"] == "kv_cache_budget_exceeded"
    assert "kv_cache_max_bytes" in error["message"] and str(BUDGET) in error["message"]
    r = http.post(CHAT, json={**_body(3, None), "max_completion_tokens": 400})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    # The server keeps serving.
    ok = http.post(CHAT, json=_body(3, max_tokens=4))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_without_max_tokens_the_default_fits_the_budget(http) -> None:
    r = http.post(CHAT, json=_body(3, max_tokens=None))
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert r.json()["choices"][0]["finish_reason"] == "length"
    # Full-attention layers and a budget of whole blocks: exactly the budget's positions.
    assert usage["prompt_tokens"] + usage["completion_tokens"] == BUDGET_TOKENS


def test_a_prompt_longer_than_the_budget_alone_is_a_400_without_a_param(http) -> None:
    r = http.post(CHAT, json=_body(60, max_tokens=None))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] is None and "kv_cache_max_bytes" in error["message"]


def _stream(http: httpx.Client, body: dict[str, Any]) -> tuple[str, str, dict[str, int]]:
    """Text, finish reason and usage of one streamed chat completion."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    text, finish, usage = "", None, None
    with http.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    return text, finish, usage


def test_concurrent_streams_over_the_budget_complete_unchanged_by_preemption(http) -> None:
    # Each fits alone (under 6 blocks); together they need about four times the budget.
    bodies = [_body(1 + i, max_tokens=20 + 6 * i) for i in range(7)]
    bodies.append(_body(5, max_tokens=40, ignore_eos=False))  # may stop at EOS
    before = _metrics(http)["moeserve_preemptions_total"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: _stream(http, b), bodies))
    after = _metrics(http)
    assert after["moeserve_preemptions_total"] > before
    assert "moeserve_kv_cache_bytes" in after and after["moeserve_kv_cache_max_bytes"] == BUDGET
    for body, (_, finish, usage) in zip(bodies, together):
        assert finish in ("length", "stop")
        if body["ignore_eos"]:
            assert finish == "length" and usage["completion_tokens"] == body["max_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    alone = [_stream(http, b) for b in bodies]
    # Usage too, but not cached_tokens: what the prompt cache reuses depends on the order.
    counts = ("prompt_tokens", "completion_tokens")
    assert [(t, f, [u[k] for k in counts]) for t, f, u in together] == [
        (t, f, [u[k] for k in counts]) for t, f, u in alone
    ]


def test_quantized_kv_serves_and_is_named_at_startup(tmp_path_factory) -> None:
    from moeserve.devtools.demo import build_checkpoint
    from tests.live import LiveServer

    # Heads of 32 values: the narrowest that quantization groups divide.
    wide = build_checkpoint(
        tmp_path_factory.mktemp("wide"), CheckpointSpec(seed=5, hidden_size=128)
    )
    live = LiveServer.start(
        wide,
        "--kv-cache-bits",
        "8",
        "--model-alias",
        "tiny",
        log_dir=tmp_path_factory.mktemp("wide-log"),
    )
    try:
        with httpx.Client(base_url=live.url, timeout=60.0) as c:
            got = c.post(CHAT, json=_body(12, 8, temperature=0))
            assert got.status_code == 200, got.text
            assert got.json()["usage"]["completion_tokens"] == 8
    finally:
        live.stop()
    assert "8-bit" in live.output()
