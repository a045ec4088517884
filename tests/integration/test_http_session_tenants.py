"""Prompt-cache sessions per API key (tenant), and keys that cannot stop the engine.

One live server with two tenant keys, an admin key and a prompt-cache directory. A tenant
reuses, lists and deletes only its own sessions; the admin key reaches every tenant's. A
session key that is not usable text gets a 400 at the boundary, and the engine keeps
serving (it used to die on a lone surrogate once a cache directory was set).
"""

from __future__ import annotations

import httpx
import pytest

CHAT = "/v1/chat/completions"
KEYS = {"a": "tenant-a-key", "b": "tenant-b-key", "admin": "admin-key"}


@pytest.fixture(scope="module")
def live(start_module_server, tmp_path_factory):
    """A server with tenants a and b, an admin key and a prompt-cache directory."""
    store = tmp_path_factory.mktemp("tenant-sessions")
    return start_module_server(
        *("--api-key", KEYS["a"], "--api-key", KEYS["b"], "--admin-api-key", KEYS["admin"]),
        *("--prompt-cache-dir", str(store), "--model-alias", "tiny", "--max-model-len", "512"),
    )


@pytest.fixture(scope="module")
def http(live):
    """Clients per key: ``http["a"].get(...)``."""
    clients = {
        who: httpx.Client(base_url=live.url, timeout=60, headers={"Authorization": f"Bearer {key}"})
        for who, key in KEYS.items()
    }
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture(autouse=True)
def _empty(http):
    assert http["admin"].delete("/v1/sessions").status_code == 200


def _chat(client: httpx.Client, content: str, **body) -> dict:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 3,
        "temperature": 0,
        **body,
    }
    r = client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _cached(out: dict) -> int:
    return out["usage"]["prompt_tokens_details"]["cached_tokens"]


def _listed(client: httpx.Client) -> list[tuple[str, str]]:
    r = client.get("/v1/sessions")
    assert r.status_code == 200, r.text
    return sorted((s["key"], s["scope"]) for s in r.json()["data"])


def test_tenants_list_and_delete_only_their_own_sessions(http):
    _chat(http["a"], "a's private notes " * 5, prompt_cache_key="notes")
    _chat(http["a"], "a's other chat", prompt_cache_key="a-only")
    _chat(http["b"], "b's private notes " * 5, prompt_cache_key="notes")
    listed_a, listed_b = _listed(http["a"]), _listed(http["b"])
    assert [k for k, _ in listed_a] == ["a-only", "notes"]
    assert [k for k, _ in listed_b] == ["notes"]
    assert {s for _, s in listed_a}.isdisjoint({s for _, s in listed_b})
    assert len(_listed(http["admin"])) == 3
    memory = {who: http[who].get("/v1/sessions").json()["bytes"] for who in KEYS}
    assert 0 < memory["b"] < memory["a"] < memory["admin"]  # each sees only its own share
    # b cannot delete a's sessions, one by one or all at once.
    assert http["b"].delete("/v1/sessions/a-only").status_code == 404
    assert http["b"].delete("/v1/sessions").json()["deleted"] == 1  # its own "notes"
    assert [k for k, _ in _listed(http["a"])] == ["a-only", "notes"]
    # The admin key can delete a tenant's session.
    assert http["admin"].delete("/v1/sessions/a-only").status_code == 200
    assert [k for k, _ in _listed(http["a"])] == ["notes"]


def test_the_same_session_key_in_two_tenants_shares_nothing(http):
    text = "the same conversation, word for word " * 4
    _chat(http["a"], text, prompt_cache_key="shared-name")
    assert _cached(_chat(http["b"], text, prompt_cache_key="shared-name")) == 0
    assert _cached(_chat(http["a"], text, prompt_cache_key="shared-name")) > 0
    # Nor do their anonymous pools.
    other = "a keyless prompt every tenant might send " * 4
    _chat(http["a"], other)
    assert _cached(_chat(http["a"], other)) > 0
    assert _cached(_chat(http["b"], other)) == 0


def test_unusable_session_keys_get_400_and_the_engine_keeps_serving(http):
    for field in ("prompt_cache_key", "user"):
        raw = (
            '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            f'"max_tokens": 2, "{field}": "\\ud800"}}'
        )
        r = http["a"].post(CHAT, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = http["a"].post(CHAT, json=body, headers={"X-Session-ID": b"\xed\xa0\x80"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Session-ID", r.text
    health = httpx.get(str(http["a"].base_url) + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert _cached(_chat(http["a"], "still serving", prompt_cache_key="after")) == 0
    assert [k for k, _ in _listed(http["a"])] == ["after"]
