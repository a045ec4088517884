"""The load generator against a fake OpenAI streaming server on a loopback port.

The fake server streams CHUNKS content chunks after a first-token delay of TTFT seconds and
GAP seconds between chunks, with SSE comment lines in between; its ``/tokenize`` counts
whitespace-separated words plus TEMPLATE tokens. The request's ``model`` selects a behaviour:
``fake`` (usage chunk), ``double`` (usage says two tokens per chunk), ``bare`` (no usage, no
``/tokenize``), ``faulty`` (requests 1-4 fail in four different ways).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from moeserve.devtools import loadgen
from moeserve.devtools.loadgen import RequestResult, run_load, summarize
from tests.live import free_port

TTFT, GAP, CHUNKS, TEMPLATE = 0.2, 0.05, 6, 5


def _chunk(content: str | None = None, usage: dict | None = None) -> str:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    return "data: " + json.dumps({"choices": choices, "usage": usage}) + "\r\n\r\n"


async def _events(model: str, index: int, words: int) -> AsyncIterator[str]:
    yield ": keepalive\r\n\r\n"
    yield ': data: {"choices": [{"delta": {"content": "not data"}}]}\r\n\r\n'
    await asyncio.sleep(TTFT)
    if model == "faulty" and index == 4:
        await asyncio.sleep(30)  # beyond the client's timeout
    yield _chunk("", None)  # a role-only chunk: no content, so not the first token
    for i in range(CHUNKS):
        if i:
            await asyncio.sleep(GAP)
            yield ": keepalive\r\n\r\n"
        yield _chunk(f"w{i} ")
        if model == "faulty" and index == 2:
            yield "data: " + json.dumps({"error": {"message": "boom", "code": 500}}) + "\n\n"
            return
        if model == "faulty" and index == 3:
            return  # the connection ends without [DONE]
    per_chunk = 2 if model == "double" else 1
    if model != "bare":
        usage = {"prompt_tokens": words + TEMPLATE, "completion_tokens": CHUNKS * per_chunk}
        yield _chunk(None, usage)
    yield "data: [DONE]\r\n\r\n"


async def _chat(request: Request):
    body = await request.json()
    assert body["stream"] and body["ignore_eos"] and body["max_tokens"] == body["min_tokens"]
    text = body["messages"][0]["content"]
    index = int(text.split()[1].rstrip(":"))
    if body["model"] == "faulty" and index == 1:
        return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
    stream = _events(body["model"], index, len(text.split()))
    return StreamingResponse(stream, media_type="text/event-stream")


async def _tokenize(request: Request):
    body = await request.json()
    if body["model"] == "bare":
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    count = len(body["messages"][0]["content"].split()) + TEMPLATE
    return JSONResponse({"count": count, "tokens": list(range(count))})


async def _models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": "fake"}, {"id": "other"}]})


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", _chat, methods=["POST"]),
            Route("/tokenize", _tokenize, methods=["POST"]),
            Route("/v1/models", _models),
        ]
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            pytest.fail("fake server did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=5)


def _load(base_url: str, model: str | None, **kw) -> dict:
    args = dict(concurrency=4, num_requests=8, prompt_tokens=100, output_tokens=CHUNKS)
    return asyncio.run(run_load(base_url, model, **{**args, **kw}))


def test_counts_latencies_and_calibration(base_url: str) -> None:
    report = _load(base_url, None)
    assert report["model"] == "fake"  # the first of /v1/models
    assert (report["completed"], report["failed"], report["num_prompts"]) == (8, 0, 8)
    # /tokenize counts words + TEMPLATE, and the prompt is "Request i:" + words.
    assert report["prompt_words"] == 100 - TEMPLATE - 2
    assert report["prompt_tokens_source"] == "usage"
    assert report["total_input_tokens"] == 8 * 100
    assert report["total_output_tokens"] == 8 * CHUNKS
    # Two waves of four, each at least TTFT + (CHUNKS - 1) * GAP long.
    assert report["duration"] >= 2 * (TTFT + (CHUNKS - 1) * GAP)
    assert report["output_throughput"] == pytest.approx(8 * CHUNKS / report["duration"])
    assert report["request_throughput"] == pytest.approx(8 / report["duration"])
    # At least the server's delay, and well before the last chunk (a TTFT taken at the end of
    # the stream would be >= TTFT + (CHUNKS - 1) * GAP); the slack absorbs a busy machine.
    assert TTFT * 1000 <= report["median_ttft_ms"] < (TTFT + (CHUNKS - 1) * GAP) * 1000
    assert report["median_ttft_ms"] <= report["p99_ttft_ms"]
    assert 0.9 * GAP * 1000 <= report["median_itl_ms"] <= GAP * 1000 + 40
    assert 0.9 * GAP * 1000 <= report["mean_tpot_ms"] <= GAP * 1000 + 40
    assert report["errors"] == []


def test_errors_are_counted(base_url: str) -> None:
    report = _load(base_url, "faulty", timeout=1.5)  # the others take ~0.5 s
    assert (report["completed"], report["failed"]) == (4, 4)
    errors = " | ".join(report["errors"])
    assert "HTTP 500" in errors and "overloaded" in errors
    assert "boom" in errors
    assert "stream ended before [DONE]" in errors
    assert "timed out" in errors
    assert report["total_output_tokens"] == 4 * CHUNKS  # failed requests count nothing


def test_without_usage_or_tokenize(base_url: str) -> None:
    report = _load(base_url, "bare", num_requests=4)
    assert report["prompt_tokens_source"] == "estimate"
    assert report["prompt_words"] == round(100 / loadgen.TOKENS_PER_WORD)
    assert report["total_output_tokens"] == 4 * CHUNKS  # one token per content chunk
    assert report["completed"] == 4


def test_multi_token_chunks_scale_itl(base_url: str) -> None:
    report = _load(base_url, "double", num_requests=4)
    assert report["total_output_tokens"] == 4 * 2 * CHUNKS
    assert 0.9 * GAP / 2 * 1000 <= report["median_itl_ms"] <= (GAP / 2) * 1000 + 20
    # TPOT spreads (CHUNKS - 1) gaps over 2 * CHUNKS - 1 tokens.
    expected_tpot = (CHUNKS - 1) * GAP / (2 * CHUNKS - 1) * 1000
    assert 0.9 * expected_tpot <= report["median_tpot_ms"] <= expected_tpot + 20


def test_same_words_give_same_prompts(base_url: str) -> None:
    report = _load(base_url, "bare", num_requests=2, prompt_words=7)
    assert report["prompt_words"] == 7
    assert loadgen.build_prompt(3, 7, seed=1) == loadgen.build_prompt(3, 7, seed=1)
    assert loadgen.build_prompt(3, 7, seed=1) != loadgen.build_prompt(4, 7, seed=1)
    assert loadgen.build_prompt(3, 7, seed=1) != loadgen.build_prompt(3, 7, seed=2)
    assert len(loadgen.build_prompt(0, 7).split()) == 2 + 7


def test_summarize_percentiles_by_hand() -> None:
    ok = [
        RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=t, latency=t + 0.4)
        for t in (0.1, 0.2, 0.3, 0.4)
    ]
    ok[0].itl = [0.1, 0.3]
    bad = RequestResult(error="HTTP 500: x", output_tokens=99, prompt_tokens=99)
    report = summarize([*ok, bad], duration=2.0, concurrency=2)
    assert (report["completed"], report["failed"]) == (4, 1)
    assert report["total_input_tokens"] == 40 and report["total_output_tokens"] == 20
    assert report["total_token_throughput"] == pytest.approx(30.0)
    assert report["mean_ttft_ms"] == pytest.approx(250.0)
    assert report["median_ttft_ms"] == pytest.approx(250.0)
    # Linear interpolation: position 0.99 * 3 = 2.97 between 300 and 400 ms.
    assert report["p99_ttft_ms"] == pytest.approx(397.0)
    assert report["mean_tpot_ms"] == pytest.approx(100.0)  # 0.4 s over 4 tokens
    assert report["median_itl_ms"] == pytest.approx(200.0)
    assert report["errors"] == ["HTTP 500: x"]


def test_cli_main_writes_json(base_url: str, tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    out = tmp_path / "r.json"
    flags = f"-c 2 -n 2 --prompt-tokens 30 --output-tokens {CHUNKS} --json {out}".split()
    args = parser.parse_args(["--url", base_url.removesuffix("/v1"), *flags])
    assert loadgen.main(args) == 0
    assert json.loads(out.read_text())["completed"] == 2
    assert "Output token throughput" in capsys.readouterr().out
    args.model = "faulty"
    args.num_requests = 2  # request 1 answers 500: a failed run exits non-zero
    assert loadgen.main(args) == 1
    args.model, args.url = None, f"http://127.0.0.1:{free_port()}/v1"  # nothing there
    assert loadgen.main(args) == 2
    assert "ConnectError" in capsys.readouterr().err


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="http"):
        asyncio.run(run_load("ftp://x", "m", concurrency=1, num_requests=1,
                             prompt_tokens=1, output_tokens=1))  # fmt: skip
    with pytest.raises(ValueError, match=">= 1"):
        asyncio.run(run_load("http://127.0.0.1:9/v1", "m", concurrency=0, num_requests=1,
                             prompt_tokens=1, output_tokens=1))  # fmt: skip


def test_stagger_spreads_the_first_wave(base_url: str) -> None:
    staggered = _load(base_url, "fake", concurrency=4, num_requests=4, stagger=0.1)
    # The last of four starts 0.3 s late and then takes at least the fake server's TTFT and
    # chunk gaps, so the run cannot end sooner however loaded the machine (a comparison with
    # an unstaggered run's duration failed under load); unstaggered it takes ~0.45 s. Each
    # request's own TTFT is measured from its start.
    assert staggered["duration"] >= 0.3 + TTFT + (CHUNKS - 1) * GAP
    assert TTFT * 1000 <= staggered["median_ttft_ms"] <= TTFT * 1000 + 150
