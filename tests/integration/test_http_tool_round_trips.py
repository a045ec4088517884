"""Tool round trips, cut tool calls and reasoning accounting against a live server (raw HTTP).

* A copy of the tiny model with GLM-4.5-Air's real chat template in its tokenizer_config: the
  conversations of ``tests/fixtures/templates/glm45_air/rendered.json`` (tool-call arguments as
  the client's JSON text, ``content`` null beside the calls, reasoning under both names) get a
  200, and the server's prompt is exactly the one transformers rendered. A call the server
  itself returned, sent back with its result, gets a 200 too.
* The plain tiny model, ``tool_choice`` required with parallel calls: a response cut by
  ``max_tokens`` inside its second call finishes with ``length``, keeps the first call only,
  and has no markup in its content, streamed or not.
* A copy with a thinking template (generation starts inside ``<think>``): every generated token
  is a reasoning token, counted rather than tokenised again, and the reasoning comes under both
  ``reasoning_content`` and ``reasoning``.

The tiny model has random weights: its calls come from the grammar, and only constrained output
is judged for content.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_http_tools import THINKING_TEMPLATE, TOOLS, USER, schema_errors
from tests.live import LiveServer

CHAT = "/v1/chat/completions"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "templates"
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _copy_with_template(tiny_model: Path, root: Path, template: str) -> Path:
    """A copy of the tiny model whose tokenizer_config.json holds ``template``."""
    model = shutil.copytree(tiny_model, root / "model")
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config), encoding="utf-8")
    (model / "chat_template.jinja").unlink(missing_ok=True)  # it would win over the config
    return model


def _serve(model: Path, root: Path) -> LiveServer:
    return LiveServer.start(model, "--model-alias", "tiny", "--max-model-len", "4096", log_dir=root)


def _post(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post(CHAT, json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def _prompt_text(http: httpx.Client, **body: Any) -> tuple[int, str]:
    """(token count, text) of the server's rendering of a conversation."""
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    text = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    return len(tokens), text


# ----- GLM-4.5: tool round trips with the client's argument text ------------------------------


@pytest.fixture(scope="module")
def glm(tiny_model: Path, tmp_path_factory) -> httpx.Client:
    root = tmp_path_factory.mktemp("glm45")
    template = (FIXTURES / "glm45_air" / "chat_template.jinja").read_text(encoding="utf-8")
    live = _serve(_copy_with_template(tiny_model, root, template), root)
    try:
        with httpx.Client(base_url=live.url, timeout=60.0) as c:
            yield c
    finally:
        live.stop()


GLM_CASES = json.loads((FIXTURES / "glm45_air" / "rendered.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", GLM_CASES["cases"], ids=lambda c: c["name"])
def test_glm45_round_trip_is_a_200_with_the_transformers_prompt(glm, case):
    request = case["request"]
    kwargs = {k: request[k] for k in ("tools", "chat_template_kwargs") if k in request}
    count, text = _prompt_text(glm, messages=request["messages"], **kwargs)
    assert text == case["expected"]
    out = _post(glm, **request, max_tokens=4, temperature=0)
    assert out["usage"]["prompt_tokens"] == count


def test_glm45_calls_go_back_as_the_client_sends_them(glm):
    """The server's own calls, returned with their JSON-text arguments, render and run."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": USER, "tools": TOOLS, "tool_choice": named, "max_tokens": 160}
    [choice] = _post(glm, **body, temperature=1.0, seed=0)["choices"]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    args = json.loads(calls[0]["function"]["arguments"])
    assert schema_errors(args, PARAMS["get_weather"]) == []
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
    ]
    out = _post(glm, messages=messages, tools=TOOLS, max_tokens=4)
    _, text = _prompt_text(glm, messages=messages, tools=TOOLS)
    assert out["usage"]["prompt_tokens"] > 0
    assert "<tool_call>get_weather\n<arg_key>city</arg_key>" in text
    assert "None" not in text  # the null content beside the call


# ----- a tool call cut by max_tokens ----------------------------------------------------------


@pytest.fixture(scope="module")
def http(start_module_server) -> httpx.Client:
    live = start_module_server("--model-alias", "tiny", "--max-model-len", "4096")
    with httpx.Client(base_url=live.url, timeout=60.0) as c:
        yield c


def _required(seed: int, max_tokens: int, **more: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": USER,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": max_tokens,
        **more,
    }


def _cut_inside_second_call(http: httpx.Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the uncut choice, a request cut a few tokens into its second call)."""
    for seed in range(12):
        [choice] = _post(http, **_required(seed, 200, logprobs=True))["choices"]
        calls = choice["message"]["tool_calls"] or []
        if len(calls) < 2 or choice["finish_reason"] != "tool_calls":
            continue
        tokens = [t["token"] for t in choice["logprobs"]["content"]]
        text = "".join(tokens)
        second = text.index("<tool_call>", text.index("</tool_call>"))
        # The first token past the second call's opening tag and its first characters.
        written = [len("".join(tokens[: i + 1])) for i in range(len(tokens))]
        cut = next(i for i, n in enumerate(written) if n > second + len('<tool_call>\n{"na'))
        return choice, _required(seed, cut + 1)
    raise AssertionError("no seed wrote two calls")


def test_a_second_call_cut_by_max_tokens_is_length(http, sse):
    uncut, body = _cut_inside_second_call(http)
    out = _post(http, **body)
    [choice] = out["choices"]
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == body["max_tokens"]
    message = choice["message"]
    first = uncut["message"]["tool_calls"][0]["function"]
    assert [c["function"] for c in message["tool_calls"]] == [first]  # the cut call is gone
    assert not message["content"]  # and its markup is not content either
    chunks = sse(http, CHAT, body)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not "".join(d.get("content") or "" for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# ----- reasoning tokens and both reasoning names ----------------------------------------------


@pytest.fixture(scope="module")
def thinking(tiny_model: Path, tmp_path_factory) -> httpx.Client:
    root = tmp_path_factory.mktemp("thinking-usage")
    live = _serve(_copy_with_template(tiny_model, root, THINKING_TEMPLATE), root)
    try:
        with httpx.Client(base_url=live.url, timeout=60.0) as c:
            yield c
    finally:
        live.stop()


@pytest.mark.parametrize("seed", range(4))
def test_reasoning_tokens_are_the_generated_ones(thinking, sse, seed):
    body = {"messages": USER, "max_tokens": 24, "temperature": 1.0, "seed": seed}
    body["ignore_eos"] = True
    out = _post(thinking, **body)
    [choice] = out["choices"]
    assert choice["finish_reason"] == "length" and not choice["message"]["content"]
    usage = out["usage"]
    # No </think> came: every generated token is reasoning, however its text tokenises again.
    assert usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"]
    message = choice["message"]
    assert message["reasoning"] == message["reasoning_content"] != ""
    stream_body = {"model": "tiny", **body, "stream_options": {"include_usage": True}}
    chunks = sse(thinking, CHAT, stream_body)
    streamed = chunks[-1]["usage"]  # its prompt may come from the cache: compare the output
    assert streamed["completion_tokens"] == usage["completion_tokens"]
    assert streamed["completion_tokens_details"] == usage["completion_tokens_details"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    pieces = [d for d in deltas if "reasoning" in d or "reasoning_content" in d]
    assert all(d["reasoning"] == d["reasoning_content"] for d in pieces)
    assert "".join(d["reasoning"] for d in pieces) == message["reasoning"]
