"""``POST /v1/completions`` (legacy): raw prompts in, text completions out.

A prompt may be a string, a list of strings, a list of token ids or a list of id lists; each
prompt runs as its own engine request with ``n`` choices, and choice ``p * n + i`` is prompt
``p``'s choice ``i``, as OpenAI numbers them. Each prompt also has its own prompt-cache entry
in the request's session (``common.prompt_session``). With ``echo`` a choice's text starts
with its prompt. LlamaIndex's ``OpenAILike(is_chat_model=False)`` lands here.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from moeserve.server.engine.events import DeltaEvent, FinishEvent, GenerationRequest, TokenLogprob
from moeserve.server.http.context_length import check_prompt_bytes
from moeserve.server.http.deps import Runtime, RuntimeDep
from moeserve.server.http.errors import APIError, error_responses
from moeserve.server.http.protocol import CompletionRequest
from moeserve.server.http.responses import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    Envelope,
    LegacyUsage,
)
from moeserve.server.http.routes import common, generation

router = APIRouter(
    tags=["completions"], responses=error_responses(400, 401, 404, 413, 429, 500, 503)
)


def _legacy_logprobs(events: list[DeltaEvent], offset: int) -> CompletionLogprobs:
    """The legacy ``logprobs`` object for some deltas, text offsets starting at ``offset``."""
    out = CompletionLogprobs()

    def add(lp: TokenLogprob, at: int) -> None:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({t: v for _, t, v in lp.top} or None)
        out.text_offset.append(at)

    # A token's own text (U+FFFD for a partial character) need not be what it adds: byte
    # tokens combine into one character, and text held back (a partial character, a possible
    # stop-string prefix) comes out with a later delta. So tokens wait for the delta that
    # shows their text and are right-aligned within it, never before its start.
    pending: list[TokenLogprob] = []
    for event in events:
        pending.extend(event.logprobs or [])
        if not event.text:
            continue
        end = offset + len(event.text)
        tail = sum(len(lp.token) for lp in pending)
        for lp in pending:
            add(lp, max(offset, end - tail))
            tail -= len(lp.token)
        pending, offset = [], end
    for lp in pending:  # never shown: a special token, a trailing partial character
        add(lp, offset)
    return out


def _prompt_ids(runtime: Runtime, prompts: list[str | list[int]]) -> list[list[int]]:
    """Tokenise the text prompts and check the id lists; refuse what cannot fit or is bad."""
    tok, out = runtime.tokenizer, []
    for prompt in prompts:
        if isinstance(prompt, str):
            check_prompt_bytes(runtime, prompt, param="prompt")
            prompt = tok.encode(prompt, add_special_tokens=True)
        if not prompt or any(not 0 <= t < tok.vocab_size for t in prompt):
            raise APIError(400, "prompt token ids must be in the vocabulary", param="prompt")
        out.append(prompt)
    return out


@router.post("/v1/completions", response_model=Completion, responses=common.STREAM_RESPONSE)
async def completions(req: CompletionRequest, runtime: RuntimeDep, http: Request):
    """Create a text completion (streamed as server-sent events when ``stream`` is true).

    Args:
        req: The OpenAI request body.
        runtime: The server runtime.
        http: The HTTP request.

    Returns:
        A ``Completion``, or an SSE stream of ``text_completion`` chunks.
    """
    runtime.check_model(req.model)
    common.check_choices(runtime, req.n, len(req.prompts()))
    # Tokenising (or checking) megabytes of prompt takes seconds: off the event loop.
    prompts = await asyncio.to_thread(_prompt_ids, runtime, req.prompts())
    rid, session = common.new_id("cmpl"), common.session_key(req, http)
    requests = [
        GenerationRequest(
            f"{rid}-{p}",
            ids,
            common.sampling_params(
                req,
                runtime,
                len(ids),
                req.max_tokens,
                logprobs=req.logprobs is not None,
                top_logprobs=req.logprobs or 0,
                prompt_param="prompt",
            ),
            n=req.n,
            session_key=common.prompt_session(session, p),
            cache_scope=common.cache_scope(req, http),
        )
        for p, ids in enumerate(prompts)
    ]
    echoes = [runtime.tokenizer.decode(ids) if req.echo else "" for ids in prompts]
    limit_param = None if req.max_tokens is None else "max_tokens"
    streams = await common.submit(runtime, requests, "prompt", limit_param)
    request_ids = [r.request_id for r in requests]
    tally = generation.Tally(prompt=sum(len(ids) for ids in prompts))
    if req.stream:
        writer = CompletionChunks(runtime, req, rid, echoes)
        chunks = generation.stream_chunks(runtime, streams, request_ids, writer, tally)
        return generation.sse_response(runtime, chunks, http)
    outputs = await generation.collect_choices(runtime, streams, request_ids, http, req.n, tally)
    choices = []
    for index, output in enumerate(outputs):
        echo = echoes[index // req.n]
        logprobs = None if req.logprobs is None else _legacy_logprobs(output.deltas, len(echo))
        reason = output.finish.finish_reason
        choices.append(
            CompletionChoice(
                index=index, text=echo + output.text, logprobs=logprobs, finish_reason=reason
            )
        )
    body = Completion(
        id=rid,
        created=int(time.time()),
        model=req.model,
        system_fingerprint=runtime.fingerprint,
        choices=choices,
        usage=LegacyUsage.count(tally.prompt, tally.completion, tally.cached),
    )
    return Response(body.model_dump_json(), media_type="application/json")


class CompletionChunks:
    """Writes the SSE chunks of one streaming completion (a ``generation.ChunkWriter``).

    A choice's first chunk, whichever it is, starts with its echoed prompt.

    Args:
        runtime: The runtime (the fingerprint).
        req: The request.
        rid: The response id.
        echoes: Each prompt's echo ("" without ``echo``).
    """

    def __init__(
        self, runtime: Runtime, req: CompletionRequest, rid: str, echoes: list[str]
    ) -> None:
        self.n, self.echoes, self.logprobs = req.n, echoes, req.logprobs is not None
        self.out = Envelope(CompletionChunk, rid, req.model, runtime.fingerprint, req.wants_usage())
        self.include_usage = self.out.include_usage
        self.echoed: set[int] = set()

    def _prefix(self, index: int, prompt: int) -> str:
        prefix = self.echoes[prompt] if index not in self.echoed else ""
        self.echoed.add(index)
        return prefix

    def delta(self, prompt: int, event: DeltaEvent) -> list[str]:
        """A chunk of the choice's new text, unless there is nothing to say."""
        index = prompt * self.n + event.index
        prefix = self._prefix(index, prompt)
        lp = _legacy_logprobs([event], 0) if self.logprobs else None
        if not event.text and not prefix and lp is None:
            return []
        choice = CompletionChoice(index=index, text=prefix + event.text, logprobs=lp)
        return [self.out.write([choice])]

    def finish(self, prompt: int, event: FinishEvent) -> list[str]:
        """The chunk with the choice's ``finish_reason``."""
        index = prompt * self.n + event.index
        text = self._prefix(index, prompt)
        choice = CompletionChoice(index=index, text=text, finish_reason=event.finish_reason)
        return [self.out.write([choice])]

    def usage(self, tally: generation.Tally) -> str:
        """The usage chunk: no choices."""
        return self.out.write([], LegacyUsage.count(tally.prompt, tally.completion, tally.cached))
