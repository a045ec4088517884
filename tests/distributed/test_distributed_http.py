"""Two ranks on loopback serve what one process serves, through the HTTP API (issue 17).

For each family with a fixture (``checkpoints.FAMILIES``: attention, MLA, sliding-window
and hybrid recurrent models), a battery of temperature-0 requests (completions, a streamed
chat, a chat with ``n=2``, a JSON-schema-constrained chat, and a second turn that hits the
prompt cache) runs against one process and against ``--distributed pipeline`` and
``--distributed tensor``; the answers must be equal. The models are tiny seeded checkpoints
of each family (``checkpoints.py``); a request's tokens are few, so a server's time is mostly
its start.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.distributed.checkpoints import FAMILIES

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
_REFERENCE: dict[str, dict[str, Any]] = {}  # family -> the one-process battery


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = http.post(path, json={"model": "m", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _streamed_chat(http: httpx.Client, messages: list[dict[str, str]]) -> str:
    body = {"model": "m", "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
    text, done = "", False
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                text += delta.get("content") or ""
    assert done
    return text


def battery(url: str) -> dict[str, Any]:
    """The requests every server answers; returns what must be equal across servers.

    Args:
        url: The server.

    Returns:
        The answers.
    """
    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        # The third prompt's chunk needs more than the step broadcast's first collective.
        long = " ".join(f"item{i}" for i in range(120))
        for i, prompt in enumerate(["The weather today is", "def main():\n    return", long]):
            got = _post(http, "/v1/completions", {"prompt": prompt, "max_tokens": 8})
            out[f"completion{i}"] = [got["choices"][0]["text"], got["usage"]]
        messages = [{"role": "user", "content": "Tell me a story about a cat."}]
        chat = _post(http, "/v1/chat/completions", {"messages": messages, "max_tokens": 8})
        out["chat"] = chat["choices"][0]["message"]["content"]
        out["stream"] = _streamed_chat(http, messages)
        assert out["stream"] == out["chat"]  # the stream carries what the whole answer does
        two = _post(http, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "n": 2})
        out["n2"] = [c["message"]["content"] for c in two["choices"]]
        assert out["n2"] == [out["chat"]] * 2
        fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
        constrained = {"messages": messages, "max_tokens": 12, "response_format": fmt}
        out["grammar"] = _post(http, "/v1/chat/completions", constrained)["choices"][0]["message"]
        turn = [{"role": "system", "content": "You are terse."}, *messages]
        body = {"messages": turn, "max_tokens": 4, "prompt_cache_key": "s1"}
        first = _post(http, "/v1/chat/completions", body)
        turn += [
            {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And then?"},
        ]
        second = _post(http, "/v1/chat/completions", {**body, "messages": turn})
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0, "the second turn should reuse the first one's cache"
        out["turns"] = [first["choices"][0]["message"], second["choices"][0]["message"], cached]
    return out


def _compare(family: str, model: Path, mode: str, launch) -> None:
    """The battery against two ranks in ``mode`` equals it against one process.

    The two ranks start while the one process (once per family) answers: a start is mostly
    waiting on imports and the ranks' handshake.
    """
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(launch, model, mode)
        if family not in _REFERENCE:
            single = launch(model, None)
            _REFERENCE[family] = battery(single.base_url.removesuffix("/v1"))
            single.stop()
        served = starting.result()
    assert battery(served.base_url.removesuffix("/v1")) == _REFERENCE[family]


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_equals_one_process(family: str, mode: str, family_dir, launch) -> None:
    _compare(family, family_dir(family), mode, launch)


def test_ranks_holding_other_cache_kinds_agree_on_a_hit(family_dir, launch) -> None:
    """Pipeline rank 0 holds only attention layers, rank 1 only linear-attention ones.

    Rank 0 alone could resume the second turn at any shared length; rank 1 only at the
    first turn's saved boundaries. Both must resume at the same one, as one process does
    (the battery compares the cached token counts, and its hit must not be empty).
    """
    family = "qwen3_next_attention_first"
    _compare(family, family_dir(family), "pipeline", launch)
