"""The prompt cache seen over HTTP: session keys, reuse across turns, ``/v1/sessions``.

The default server keeps the prompt cache on (``prompt_cache = true``). A request's session is
``prompt_cache_key``, else the ``X-Session-ID`` header, else ``user``; ``GET /v1/sessions``
shows which key a request was stored under. How much was reused is read from
``usage.prompt_tokens_details.cached_tokens`` and checked against common token prefixes
computed from ``/tokenize``. A session reuses only its own entries and the anonymous pool
(requests without a key); ``cache_salt`` gives a request a pool of its own; keys are checked
at the boundary.
"""

from __future__ import annotations

import httpx
import pytest

CHAT = "/v1/chat/completions"


def _tokens(client, messages) -> list[int]:
    return client.post("/tokenize", json={"messages": messages}).json()["tokens"]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _chat(client, messages, headers=None, **body) -> dict:
    body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, **body}
    r = client.post(CHAT, json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _keys(client) -> list[str]:
    r = client.get("/v1/sessions")
    assert r.status_code == 200, r.text
    return [s["key"] for s in r.json()["data"]]


@pytest.fixture(autouse=True)
def _empty_cache(client):
    assert client.delete("/v1/sessions").status_code == 200
    assert _keys(client) == []


def test_session_key_precedence(client):
    messages = [{"role": "user", "content": "Who picked the peppers?"}]
    _chat(client, messages, {"X-Session-ID": "hdr-1"}, prompt_cache_key="pck-1", user="user-1")
    assert _keys(client) == ["pck-1"]
    _chat(client, messages, {"X-Session-ID": "hdr-2"}, user="user-2")
    _chat(client, messages, user="user-3")
    assert sorted(_keys(client)) == ["hdr-2", "pck-1", "user-3"]
    r = client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "Peter Piper", "max_tokens": 3, "prompt_cache_key": "c-1"},
    )
    assert r.status_code == 200
    assert "c-1" in _keys(client)
    listing = client.get("/v1/sessions").json()
    assert listing["object"] == "list" and listing["bytes"] > 0
    for entry in listing["data"]:
        assert entry["tokens"] > 0 and entry["bytes"] > 0 and entry["pinned"] is False


def test_listing_sums_up_the_anonymous_pool(client):
    empty = client.get("/v1/sessions").json()
    assert empty["anonymous"] == {"entries": 0, "tokens": 0, "bytes": 0}
    first = _chat(client, [{"role": "user", "content": "No key at all."}])
    listing = client.get("/v1/sessions").json()
    assert listing["data"] == []  # no key to list it under
    pool = listing["anonymous"]
    assert pool["entries"] == 1 and pool["tokens"] >= first["usage"]["prompt_tokens"]
    assert pool["bytes"] == listing["bytes"] > 0


def test_next_turn_reuses_the_session(client):
    system = {"role": "system", "content": "You answer questions about woodchucks. " * 8}
    turn1 = [system, {"role": "user", "content": "How much wood?"}]
    first = _chat(client, turn1, prompt_cache_key="chat-a")
    reply = first["choices"][0]["message"]["content"]
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    [entry] = client.get("/v1/sessions").json()["data"]
    assert entry["key"] == "chat-a"
    assert entry["tokens"] >= first["usage"]["prompt_tokens"]

    second = _chat(client, turn2, prompt_cache_key="chat-a")
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert _common(_tokens(client, turn1), _tokens(client, turn2)) <= cached
    assert cached < second["usage"]["prompt_tokens"]

    # Reuse never changes the output: the same turn from an empty cache says the same.
    assert client.delete("/v1/sessions").json()["deleted"] >= 1
    cold = _chat(client, turn2, prompt_cache_key="chat-a")
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cold["choices"] == second["choices"]


def _cached(out: dict) -> int:
    return out["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_sessions_are_isolated(client):
    alpha = [{"role": "user", "content": "alpha " * 20}]
    beta = [{"role": "user", "content": "beta " * 20}]
    _chat(client, alpha, prompt_cache_key="s-alpha")
    _chat(client, beta, prompt_cache_key="s-beta")
    follow = [*beta, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    # Keyed to alpha: alpha's own entry, sharing only the template's opening.
    keyed = _chat(client, follow, prompt_cache_key="s-alpha")
    assert _cached(keyed) == _common(_tokens(client, alpha), _tokens(client, follow))
    # No key: only the anonymous pool, which holds nothing yet; never beta's conversation.
    assert _cached(_chat(client, follow)) == 0
    # Keyed to beta: its own conversation.
    own = _chat(client, follow, prompt_cache_key="s-beta")
    assert _cached(own) >= _common(_tokens(client, beta), _tokens(client, follow))


def test_anonymous_pool_is_shared_and_keyed_requests_may_read_it(client):
    system = {"role": "system", "content": "Shared instructions for every caller. " * 6}
    first = [system, {"role": "user", "content": "one"}]
    second = [system, {"role": "user", "content": "two"}]
    shared = _common(_tokens(client, first), _tokens(client, second))
    _chat(client, first)
    assert _cached(_chat(client, second)) >= shared
    assert _cached(_chat(client, second, prompt_cache_key="new-session")) >= shared


def _completion(client, prompt: str, **body) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, **body}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_another_session_cannot_guess_a_prompt_from_cached_tokens(client):
    # The oracle: a miss used to fall back to the longest prefix of *every* session, and
    # cached_tokens told the prober how far its guess matched someone else's prompt.
    secret = "Account notes. The vault code is 7"
    _completion(client, secret + " and nothing else.", prompt_cache_key="victim")
    # Each probe is a fresh session (its own entry cannot answer), so only the victim's
    # entry could: it must never be read.
    for field in ("prompt_cache_key", "user"):
        cached = [
            _cached(
                _completion(
                    client, f"Account notes. The vault code is {d}", **{field: f"probe-{field}-{d}"}
                )
            )
            for d in "0123456789"
        ]
        assert cached == [0] * 10, (field, cached)
    assert _cached(_completion(client, secret)) == 0  # no key: the (empty) anonymous pool
    assert _cached(_completion(client, secret, prompt_cache_key="victim")) > 0


def test_cache_salt_separates_pools(client):
    messages = [{"role": "user", "content": "salted prompt " * 10}]
    _chat(client, messages, prompt_cache_key="salty", cache_salt="s1")
    assert _cached(_chat(client, messages, prompt_cache_key="salty")) == 0
    assert _cached(_chat(client, messages, prompt_cache_key="salty", cache_salt="s2")) == 0
    assert _cached(_chat(client, messages, prompt_cache_key="salty", cache_salt="s1")) > 0
    _chat(client, messages, cache_salt="s3")  # the salted anonymous pool is its own too
    assert _cached(_chat(client, messages)) == 0
    assert _cached(_chat(client, messages, cache_salt="s3")) > 0


def _assert_400(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize("field", ["prompt_cache_key", "user", "cache_salt"])
def test_bad_session_keys_are_refused(client, field):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for bad in ("a\x00b", "tab\there", "k" * 257):
        _assert_400(client.post(CHAT, json={**body, field: bad}), field)
    raw = f'{{"model": "tiny", "prompt": "x", "max_tokens": 2, "{field}": "\\ud800"}}'
    r = client.post(
        "/v1/completions", content=raw.encode(), headers={"content-type": "application/json"}
    )
    _assert_400(r, field)
    ok = client.post(CHAT, json={**body, field: "é日本 ok" + "k" * 200})
    assert ok.status_code == 200, ok.text
    assert client.get("/v1/sessions").status_code == 200


def test_bad_session_header_is_refused(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    # A surrogate in UTF-8's form (not valid UTF-8), a stray byte, an overlong key.
    for value in (b"\xed\xa0\x80", b"abc\xff", b"k" * 257):
        _assert_400(client.post(CHAT, json=body, headers={"X-Session-ID": value}), "X-Session-ID")
    r = client.post(CHAT, json=body, headers={"X-Session-ID": "café".encode()})
    assert r.status_code == 200, r.text
    assert "café" in _keys(client)


def test_delete_one_session(client):
    messages = [{"role": "user", "content": "Sea shells"}]
    _chat(client, messages, prompt_cache_key="gone")
    _chat(client, messages, prompt_cache_key="kept")
    r = client.delete("/v1/sessions/gone")
    assert r.status_code == 200
    assert r.json() == {"id": "gone", "object": "session", "deleted": True}
    assert _keys(client) == ["kept"]
    again = client.delete("/v1/sessions/gone")
    assert again.status_code == 404
    error = again.json()["error"]
    assert error["code"] == "not_found" and set(error) == {"message", "type", "param", "code"}


def test_cache_off(start_server):
    live = start_server("--prompt-cache", "false", "--model-alias", "tiny")
    with httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.get("/v1/sessions")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        messages = [{"role": "user", "content": "same prompt twice"}]
        for _ in range(2):
            usage = _chat(c, messages, prompt_cache_key="k")["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == 0
