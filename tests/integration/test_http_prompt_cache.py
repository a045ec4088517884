"""Multi-turn chats over HTTP reuse exactly the previous turn's prompt and reply.

Replies are pinned to a known token sequence so that their re-tokenisation, when the chat
template renders them into the next turn, is the same as what the model generated: a
forced word (``logit_bias``) for ``min_tokens`` tokens, then a forced end-of-sequence. The
expected reuse of turn k is then exactly the tokens of turn k-1's prompt plus its reply.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx

CHAT = "/v1/chat/completions"
REPLY_TOKENS = 3


def _ids(http: httpx.Client, **body) -> list[int]:
    return http.post("/tokenize", json=body).json()["tokens"]


def _forced_reply_bias(http: httpx.Client, eos: int) -> dict[str, float]:
    word = _ids(http, prompt=" the")
    assert len(word) == 1, "the tokenizer should have ' the' as one token"
    return {str(word[0]): 30.0, str(eos): 100.0}


def _turn(http, messages, session, bias, **extra) -> dict:
    body = {
        "model": "tiny",
        "messages": messages,
        "temperature": 0,
        "max_tokens": 20,
        "min_tokens": REPLY_TOKENS,
        "logit_bias": bias,
        "prompt_cache_key": session,
        **extra,
    }
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _conversation(http, session, bias, turns, system="You are a terse assistant."):
    """Run a chat; return (cached_tokens per turn, expected per turn, replies)."""
    messages = [{"role": "system", "content": system}]
    cached, expected, replies = [], [], []  # session None: keyless (the anonymous pool)
    previous = 0
    for k in range(turns):
        messages.append({"role": "user", "content": f"Question number {k}: how is the weather?"})
        out = _turn(http, messages, session, bias)
        reply = out["choices"][0]["message"]["content"]
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["usage"]["completion_tokens"] == REPLY_TOKENS + 1  # three words, then EOS
        cached.append(out["usage"]["prompt_tokens_details"]["cached_tokens"])
        expected.append(previous)
        prompt = _ids(http, messages=messages)  # this turn's prompt, as the server tokenised it
        assert len(prompt) == out["usage"]["prompt_tokens"]
        previous = len(prompt) + len(_ids(http, prompt=reply))
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
    return cached, expected, replies


def _eos(tiny_model: Path) -> int:
    return int(json.loads((tiny_model / "config.json").read_text())["eos_token_id"])


def test_six_turns_reuse_the_previous_prompt_and_reply_exactly(server, tiny_model) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        bias = _forced_reply_bias(http, _eos(tiny_model))
        cached, expected, replies = _conversation(http, "six-turns", bias, 6)
    assert all(r == " the the the" or r.strip() == "the the the" for r in replies), replies
    assert cached[0] == 0
    assert cached == expected


def test_sessions_sharing_a_system_prompt_stay_isolated(server, tiny_model) -> None:
    system = "Shared system prompt: " + "always answer briefly and politely. " * 8
    with httpx.Client(base_url=server.url, timeout=60) as http:
        bias = _forced_reply_bias(http, _eos(tiny_model))
        system_len = len(
            _ids(
                http, messages=[{"role": "system", "content": system}], add_generation_prompt=False
            )
        )
        a_cached, a_expected, _ = _conversation(http, "iso-a", bias, 3, system)
        b_cached, b_expected, _ = _conversation(http, "iso-b", bias, 3, system)
        # Sessions never read each other's entries, not even the shared system prompt.
        assert b_cached[0] == 0
        # A keyless request puts the system prompt in the shared pool; a new session's first
        # turn reuses it, and still nothing of a's or b's turns.
        _conversation(http, None, bias, 1, system)
        c_cached, _, _ = _conversation(http, "iso-c", bias, 1, system)
        assert system_len <= c_cached[0] < a_expected[1]
        assert b_cached[1:] == b_expected[1:] and a_cached[1:] == a_expected[1:]
        listed = {s["key"] for s in http.get("/v1/sessions").json()["data"]}
        assert {"iso-a", "iso-b"} <= listed


def test_each_prompt_of_a_completion_keeps_its_own_entry(server) -> None:
    # Two token-id prompts with nothing in common, each prefilled once per request.
    a, b = list(range(20, 40)), list(range(60, 75))
    body = {"model": "tiny", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:

        def cached(prompts: list[list[int]], key: str) -> int:
            payload = {**body, "prompt": prompts, "prompt_cache_key": key}
            r = http.post("/v1/completions", json=payload)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        # What each prompt reuses of its own previous run, alone in its session.
        alone = []
        for prompt, key in ((a, "solo-a"), (b, "solo-b")):
            assert cached([prompt], key) == 0
            alone.append(cached([prompt], key))
        assert alone[0] > 0 and alone[1] > 0
        # Together in one session, each reuses its own entry: neither overwrote the other.
        assert cached([a, b], "pair") == 0
        assert cached([a, b], "pair") == alone[0] + alone[1]
        # Prompt 0's entry is the session's own, found by a single-prompt request.
        assert cached([a], "pair") == alone[0]
        listed = {s["key"] for s in http.get("/v1/sessions").json()["data"]}
    assert {"pair", "pair#1"} <= listed


def test_outputs_with_and_without_the_cache_are_identical(server, start_server) -> None:
    cold = start_server("--no-prompt-cache", "--model-alias", "tiny", "--max-model-len", "512")
    messages = [{"role": "system", "content": "Sample freely."}]
    with (
        httpx.Client(base_url=server.url, timeout=60) as warm_http,
        httpx.Client(base_url=cold.url, timeout=60) as cold_http,
    ):
        for k in range(4):
            messages.append({"role": "user", "content": f"turn {k} of the comparison"})
            body = {
                "model": "tiny",
                "messages": messages,
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
                "prompt_cache_key": "same-output",
            }
            warm = warm_http.post(CHAT, json=body).json()
            plain = cold_http.post(CHAT, json=body).json()
            assert warm["choices"][0]["message"] == plain["choices"][0]["message"]
            assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            if k:
                assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            messages.append(warm["choices"][0]["message"])


def test_persisted_sessions_survive_a_restart(start_server, tiny_model, tmp_path) -> None:
    store = tmp_path / "sessions"
    flags = ("--prompt-cache-dir", str(store), "--model-alias", "tiny", "--max-model-len", "512")
    first = start_server(*flags)
    with httpx.Client(base_url=first.url, timeout=60) as http:
        bias = _forced_reply_bias(http, _eos(tiny_model))
        messages = [{"role": "user", "content": "Remember this conversation, please."}]
        out = _turn(http, messages, "durable", bias)
        reply = out["choices"][0]["message"]["content"]
        expected = len(_ids(http, messages=messages)) + len(_ids(http, prompt=reply))
    first.stop()  # graceful: the engine writes every session at shutdown
    assert list(store.glob("*.safetensors")), "nothing was persisted"
    second = start_server(*flags)
    with httpx.Client(base_url=second.url, timeout=60) as http:
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And now?"},
        ]
        after = _turn(http, messages, "durable", bias)
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == expected


def _wait_for_files(store: Path, timeout: float = 30.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while not (files := list(store.glob("*.safetensors"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    return files


def test_finished_turns_survive_kill_9(start_server, tiny_model, tmp_path) -> None:
    # Sessions used to reach the disk only on eviction or a graceful shutdown.
    store = tmp_path / "sessions"
    flags = ("--prompt-cache-dir", str(store), "--model-alias", "tiny", "--max-model-len", "512")
    first = start_server(*flags)
    with httpx.Client(base_url=first.url, timeout=60) as http:
        bias = _forced_reply_bias(http, _eos(tiny_model))
        messages = [{"role": "user", "content": "Keep this even if the power goes out."}]
        reply = _turn(http, messages, "crash-safe", bias)["choices"][0]["message"]["content"]
        expected = len(_ids(http, messages=messages)) + len(_ids(http, prompt=reply))
    assert _wait_for_files(store), "the finished turn was not written in the background"
    os.killpg(first.process.pid, signal.SIGKILL)  # no shutdown, no flush
    first.process.wait(30)
    stale = [store / ".0123abcd.safetensors.tmp", store / ".4567.safetensors"]
    for path in stale:  # what a write torn by a crash leaves
        path.write_bytes(b"\x10\x00\x00\x00")
    second = start_server(*flags)
    assert not any(path.exists() for path in stale), "stale temporary files were kept"
    with httpx.Client(base_url=second.url, timeout=60) as http:
        [row] = http.get("/v1/sessions").json()["data"]  # on disk only, listed all the same
        assert (row["key"], row["persisted"], row["tokens"]) == ("crash-safe", True, expected)
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "Still there?"},
        ]
        after = _turn(http, messages, "crash-safe", bias)
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == expected


def _gauge(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_byte_budget_holds_under_load_as_the_metrics_show(start_server) -> None:
    budget = 200_000  # a few sessions of the tiny model (512 bytes of KV per token)
    live = start_server(
        "--prompt-cache-max-bytes", str(budget), "--model-alias", "tiny", "--max-model-len", "512"
    )
    seen = []
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for s in range(12):
            messages = [{"role": "user", "content": f"session {s}: " + "tell me more " * 20}]
            body = {
                "model": "tiny",
                "messages": messages,
                "max_tokens": 8,
                "ignore_eos": True,
                "prompt_cache_key": f"load-{s}",
            }
            assert http.post(CHAT, json=body).status_code == 200
            seen.append(_gauge(http, "moeserve_prompt_cache_bytes"))
        listing = http.get("/v1/sessions").json()
    assert seen[0] > 0  # the gauge reports real bytes
    assert max(seen) <= budget and listing["bytes"] <= budget
    assert len(listing["data"]) < 12  # older sessions were evicted to stay within it
