"""One streaming chat-completion request, measured: the load generator's HTTP client side.

``one_request`` sends one streaming ``/chat/completions`` request and records what it saw in a
``RequestResult``. What it knows about servers:

* Token counts come from the final ``usage`` chunk (``stream_options.include_usage``);
  without one, each content chunk counts as one token.
* SSE comment lines (``: keepalive``) are ignored; ``{"error": ...}`` data, ``event: error``,
  an HTTP status other than 200, a stream that ends before ``[DONE]``, a network error or the
  per-request timeout make a request fail.
* ITL gaps are measured between content chunks. When ``usage`` shows that chunks carried more
  than one token on average (a detokenizer holding back partial characters), each gap is
  divided by that average; per-chunk token counts are not on the wire, so this is the closest
  an HTTP client can get.

It does not choose prompts, the request body, concurrency or the server (``loadgen``), nor
aggregate results into a report (``loadgen_report``). It needs only httpx.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestResult:
    """What one request measured. Times are seconds from the moment it was sent."""

    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None  # first chunk with non-empty content
    latency: float = 0.0  # until the stream ended
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    chunks: int = 0  # content chunks received


async def _sse_data(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """Yield ``(event, data)`` per server-sent event, skipping comment lines."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue  # comments: keepalives carry nothing
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield event, "\n".join(data)


def _chunk_text(chunk: dict[str, Any]) -> str:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content"):
            return delta["content"]
    return ""


async def _consume(response: httpx.Response, result: RequestResult, start: float) -> bool:
    """Read one stream into ``result``. Returns whether ``[DONE]`` arrived."""
    last = start
    async for event, data in _sse_data(response):
        if data.strip() == "[DONE]":
            return True
        chunk = json.loads(data)
        if event == "error" or "error" in chunk:
            err = chunk.get("error", chunk)
            result.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return False
        if usage := chunk.get("usage"):
            result.prompt_tokens = usage.get("prompt_tokens") or result.prompt_tokens
            result.output_tokens = usage.get("completion_tokens") or 0
        if _chunk_text(chunk):
            now = time.perf_counter()
            if result.ttft is None:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
            result.chunks += 1
    return False


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], result: RequestResult, start: float
) -> None:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:200]
            result.error = f"HTTP {response.status_code}: {text}"
        elif not await _consume(response, result, start) and not result.error:
            result.error = "stream ended before [DONE]"


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], timeout: float
) -> RequestResult:
    """Send one streaming request and measure it; never raises for server or network errors.

    Args:
        client: The HTTP client.
        url: The ``/chat/completions`` URL.
        body: The request body (``stream`` set, ``include_usage`` asked for).
        timeout: Seconds the whole request may take.

    Returns:
        What it measured; ``ok`` is False and ``error`` says why when it failed.
    """
    result = RequestResult()
    start = time.perf_counter()
    try:
        # httpx's timeout bounds each read; this bounds the whole request.
        await asyncio.wait_for(_stream(client, url, body, result, start), timeout)
    except asyncio.TimeoutError:
        result.error = f"timed out after {timeout} s"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
    result.latency = time.perf_counter() - start
    result.ok = not result.error
    if result.output_tokens == 0:
        result.output_tokens = result.chunks  # no usage chunk: one token per content chunk
    if result.chunks > 1 and result.output_tokens > result.chunks:
        per_chunk = result.output_tokens / result.chunks
        result.itl = [gap / per_chunk for gap in result.itl]
    return result
