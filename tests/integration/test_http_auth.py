"""API keys on live servers: ``--api-key`` (repeated) and ``--api-key-file``.

Every route but ``/health`` needs a key, documentation and metrics included; a missing or
wrong key gets 401 in OpenAI's envelope, a valid key (any of them) gets the normal answer.
"""

from __future__ import annotations

import httpx
import pytest

ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
    ),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "x"}),
    ("POST", "/detokenize", {"tokens": [5]}),
    ("GET", "/metrics", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/v1/sessions", None),
]


@pytest.fixture(scope="module")
def keyed(start_module_server):
    """A server started with two ``--api-key`` flags."""
    return start_module_server(
        "--api-key", "k1", "--api-key", "k2", "--model-alias", "tiny", "--max-model-len", "512"
    )


@pytest.fixture(scope="module")
def key_file_server(start_module_server, tmp_path_factory):
    """A server whose keys come from a file (comments and blank lines skipped)."""
    path = tmp_path_factory.mktemp("keys") / "api_keys"
    path.write_text("# team keys\n\nfile-key-1\n  file-key-2  \n")
    return start_module_server(
        "--api-key-file", str(path), "--model-alias", "tiny", "--max-model-len", "512"
    )


_CLIENTS: dict[str, httpx.Client] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_clients():
    """One connection pool per server, closed with the module (new clients are slow)."""
    yield
    for c in _CLIENTS.values():
        c.close()
    _CLIENTS.clear()


def _call(url: str, method: str, path: str, body, headers: dict[str, str]) -> httpx.Response:
    if url not in _CLIENTS:
        _CLIENTS[url] = httpx.Client(base_url=url, timeout=60)
    return _CLIENTS[url].request(method, path, json=body, headers=headers)


def _assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, (r.request.url, r.text)
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_key_required_on_every_route(keyed, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}):
        _assert_401(_call(keyed.url, method, path, body, headers))
    for key in ("k1", "k2"):
        r = _call(keyed.url, method, path, body, {"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, (path, r.text)


def test_unknown_path_needs_a_key_too(keyed):
    _assert_401(_call(keyed.url, "GET", "/v1/nothing", None, {}))
    r = _call(keyed.url, "GET", "/v1/nothing", None, {"Authorization": "Bearer k1"})
    assert r.status_code == 404


def test_api_key_header_is_accepted(keyed):
    r = _call(keyed.url, "GET", "/v1/models", None, {"api-key": "k2"})
    assert r.status_code == 200


def test_health_is_open(keyed, key_file_server):
    for live in (keyed, key_file_server):
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200


def test_streaming_with_a_key(keyed, sse):
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
        chunks = sse(c, "/v1/chat/completions", body, headers={"Authorization": "Bearer k2"})
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_key_file(key_file_server, method, path, body):
    url = key_file_server.url
    _assert_401(_call(url, method, path, body, {}))
    _assert_401(_call(url, method, path, body, {"Authorization": "Bearer # team keys"}))
    for key in ("file-key-1", "file-key-2"):
        r = _call(url, method, path, body, {"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, (path, r.text)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer clé".encode()},
        {"Authorization": b"Bearer \xff\xfe"},
        {"api-key": "k1é".encode()},
        {"Authorization": b"Bearer k1" + "é".encode()},
    ],
)
def test_non_ascii_key_gets_401(keyed, headers):
    # compare_digest on a non-ASCII str raised: a 500 for anyone, no valid key needed.
    _assert_401(_call(keyed.url, "GET", "/v1/models", None, headers))
    assert _call(keyed.url, "GET", "/health", None, {}).status_code == 200
