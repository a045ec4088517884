"""A load generator for any OpenAI-compatible server: streaming chat completions under load.

``run_load`` sends ``num_requests`` streaming ``/chat/completions`` requests from
``concurrency`` clients (a semaphore; all requests are submitted at once), each with a prompt of
about ``prompt_tokens`` tokens and a fixed output length, and reports what ``vllm bench serve``
reports, under the same names: throughput, time to first token (TTFT), time per output token
(TPOT = (latency - TTFT) / (output tokens - 1)) and inter-token latency (ITL), as mean, median
and p99 in milliseconds (percentiles interpolate linearly, as numpy's default does).

What it knows about servers:

* Prompts are deterministic (a seeded word list) and distinct (each request has its own words
  and number), so no server can reuse a cached prefix across requests beyond the chat
  template's header. Their length is calibrated with the server's ``/tokenize`` (moeserve,
  vLLM) when it answers, else estimated at ~1.3 tokens per word; the report says which
  (``prompt_tokens_source``) and carries ``prompt_words`` so another server can be sent the
  very same prompts.
* The output length is fixed with ``max_tokens`` plus ``ignore_eos``/``min_tokens`` (moeserve and
  vLLM honour them; mlx_lm.server ignores unknown fields, so there a request may end early at
  EOS).
* How one streaming request is read and timed (token counts, SSE, failures, ITL) is
  ``loadgen_request``'s.

This module chooses the prompts, calibrates their length, runs the clients and is the
``moeserve bench`` command. Turning the results into the report and its table is
``loadgen_report``'s; ``RequestResult``, ``summarize`` and ``format_report`` are re-exported
here, where their users import them from.

It knows nothing of any server's internals and needs only httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from moeserve.devtools.loadgen_report import format_report as format_report
from moeserve.devtools.loadgen_report import summarize as summarize
from moeserve.devtools.loadgen_request import RequestResult as RequestResult
from moeserve.devtools.loadgen_request import one_request

TOKENS_PER_WORD = 1.3  # typical for English under BPE vocabularies; used without /tokenize
_CALIBRATION_SAMPLES = 4
_WORDS = (
    "the model serves many clients at once while each request waits for its next token and "
    "a scheduler decides which sequences run in every step of the engine loop so that long "
    "prompts never stall short answers experts route tokens through small networks whose "
    "outputs mix by learned weights before attention reads the cache of keys and values "
    "written by earlier layers during prefill"
).split()


def build_prompt(index: int, words: int, seed: int = 0) -> str:
    """A deterministic prompt of ``words`` words, distinct for each request index and seed.

    Args:
        index: Request number (written first, so prompts differ from their first tokens).
        words: Number of words after the request number.
        seed: Run seed; the same (index, words, seed) always gives the same text.

    Returns:
        The prompt text.
    """
    rng = random.Random(seed * 1_000_003 + index)
    return f"Request {index}: " + " ".join(rng.choice(_WORDS) for _ in range(words))


async def _count_tokens(client: httpx.AsyncClient, root: str, model: str, text: str) -> int | None:
    """Prompt tokens of one chat message via ``/tokenize``, or None if the server has none."""
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    try:
        response = await client.post(f"{root}/tokenize", json=body)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    count = response.json().get("count")
    return count if isinstance(count, int) and count > 0 else None


async def calibrate_words(
    client: httpx.AsyncClient, root: str, model: str, prompt_tokens: int, seed: int = 0
) -> tuple[int, int | None]:
    """Choose the word count whose prompts (chat template included) come closest to the target.

    Args:
        client: The HTTP client.
        root: Server root URL (without ``/v1``), where ``/tokenize`` lives.
        model: Model name.
        prompt_tokens: The target prompt length in tokens.
        seed: The run's prompt seed; its first prompts are measured.

    Returns:
        ``(words, tokens)``: tokens is the mean measured length, or None when the server has
        no ``/tokenize`` and the word count is the ~1.3 tokens-per-word estimate.
    """
    words = max(1, round(prompt_tokens / TOKENS_PER_WORD))
    tried: dict[int, int] = {}  # words -> mean tokens
    for _ in range(4):  # each round corrects by the measured tokens per word
        # Several prompts: random words tokenize unevenly, and one sample can be 10% off.
        counts = [
            await _count_tokens(client, root, model, build_prompt(i, words, seed))
            for i in range(_CALIBRATION_SAMPLES)
        ]
        if None in counts:
            return words, None
        tried[words] = count = round(statistics.fmean(counts))
        words = max(1, words + round((prompt_tokens - count) * words / count))
        if words in tried:
            break
    best = min(tried, key=lambda w: abs(tried[w] - prompt_tokens))
    return best, tried[best]


def _normalize_url(url: str) -> str:
    """The OpenAI base URL: ``http://host:port`` gains ``/v1``; a trailing slash goes."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"--url must be an http(s) URL such as http://127.0.0.1:8000/v1: {url!r}")
    url = url.rstrip("/")
    return url + "/v1" if parsed.path in ("", "/") else url


async def _first_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id ``/v1/models`` lists (RuntimeError when there is none)."""
    response = await client.get(f"{base_url}/models")
    response.raise_for_status()
    data = response.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/models lists no model; pass --model")
    return data[0]["id"]


def _request_body(model: str, prompt: str, output_tokens: int) -> dict:
    # Greedy, as ``vllm bench serve`` sends: the same cheap sampling path on every server.
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": output_tokens,
        "min_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def run_load(
    url: str,
    model: str | None,
    *,
    concurrency: int,
    num_requests: int,
    prompt_tokens: int,
    output_tokens: int,
    api_key: str | None = None,
    timeout: float = 600,
    prompt_words: int | None = None,
    seed: int = 0,
    stagger: float = 0.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """Run one load and report it.

    Args:
        url: The OpenAI base URL (``http://host:port/v1``).
        model: Model name; None: the first of ``/v1/models``.
        concurrency: Requests in flight at most.
        num_requests: Requests in all.
        prompt_tokens: Target prompt length in tokens.
        output_tokens: Tokens to generate per request.
        api_key: Sent as a bearer token when given.
        timeout: Seconds one request may take in all.
        prompt_words: Use this many words per prompt instead of calibrating (to send two
            servers the same prompts).
        seed: Prompt seed; a different seed gives different prompts.
        stagger: Seconds between the starts of the first ``concurrency`` requests (0: all
            at once, as ``vllm bench serve`` sends them); later ones start as slots free.
        transport: An httpx transport (tests).

    Returns:
        The report of ``summarize`` plus ``model``, ``prompt_words``, ``prompt_tokens_source``.

    Raises:
        ValueError: On a count or length below 1.
    """
    if min(concurrency, num_requests, prompt_tokens, output_tokens) < 1:
        raise ValueError("concurrency, requests, prompt and output tokens must all be >= 1")
    base = _normalize_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        headers=headers, timeout=httpx.Timeout(timeout), limits=limits, transport=transport
    ) as client:
        model = model or await _first_model(client, base)
        measured = None
        if prompt_words is None:
            prompt_words, measured = await calibrate_words(
                client, base.removesuffix("/v1"), model, prompt_tokens, seed
            )
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> RequestResult:
            body = _request_body(model, build_prompt(index, prompt_words, seed), output_tokens)
            await asyncio.sleep(stagger * min(index, concurrency))
            async with gate:
                return await one_request(client, f"{base}/chat/completions", body, timeout)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(num_requests)))
        duration = time.perf_counter() - start
    source = "usage" if any(r.prompt_tokens for r in results) else None
    source = source or ("tokenize" if measured is not None else "estimate")
    for r in results:  # a server without usage: the calibrated (or estimated) length
        r.prompt_tokens = r.prompt_tokens or measured or round(prompt_words * TOKENS_PER_WORD)
    report = summarize(list(results), duration, concurrency)
    report.update(model=model, prompt_words=prompt_words, prompt_tokens_source=source)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the load generator's flags (``moeserve bench``).

    Args:
        parser: The (sub)parser to extend.
    """
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL (default: %(default)s)"
    )
    parser.add_argument(
        "-c", "--concurrency", type=int, default=16, help="clients in flight (default: %(default)s)"
    )
    parser.add_argument(
        "-n", "--num-requests", type=int, default=64, help="requests in all (default: %(default)s)"
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=200,
        help="prompt length in tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--output-tokens", type=int, default=128, help="tokens per response (default: %(default)s)"
    )
    parser.add_argument("--model", default=None, help="model name (default: first of /models)")
    # The default is read from the environment but never shown: it is a secret.
    parser.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds per request (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (default: %(default)s)")
    parser.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="seconds between the first requests' starts (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write JSON")


def main(args: argparse.Namespace) -> int:
    """Run one load from parsed flags; print the table (and write JSON).

    Args:
        args: Parsed by a parser that ``add_arguments`` set up.

    Returns:
        0 when every request completed, 1 when some failed, 2 when the server is unreachable.
    """
    keys = ("concurrency", "num_requests", "prompt_tokens", "output_tokens", "api_key", "timeout")
    kwargs = {k: getattr(args, k) for k in (*keys, "seed", "stagger")}
    try:
        report = asyncio.run(run_load(args.url, args.model, **kwargs))
    except (httpx.HTTPError, RuntimeError) as e:  # no server there, or it lists no model
        print(f"moeserve bench: error: {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if report["prompt_tokens_source"] == "estimate":
        print(f"note: no /tokenize; prompts estimated at {TOKENS_PER_WORD} tokens per word")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["failed"] == 0 else 1
