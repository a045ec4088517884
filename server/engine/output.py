"""Turning sampled token ids into what a client reads: text, stop decisions and events.

For every sequence it keeps a streaming detokenizer (text never ends in half a character), a
stop-string matcher (text that may still become a stop string is held back) and the pending
delta. ``process`` takes one step's samples: it advances the grammar matcher, asks
``check_stop`` whether the sequence ends, and buffers text, ids and logprobs; ``flush`` posts
each live sequence's buffered delta to its request's event loop, one cross-thread call per
sequence and step. A sequence that finishes gets its last text and a ``FinishEvent`` at once.

Nothing a request carries can stop the engine from here: whatever one sequence's output work
raises (a detokenizer, a stop matcher, a grammar) ends only its request with one
``ErrorEvent``, and its other choices are aborted.

It knows sequences, the tokenizer's text and the events; it does not know the model, MLX,
the scheduling policy, the prompt cache or HTTP. It tells the scheduler when a sequence ends
(``finish``) or a failed request must go (``abort``), and calls back the engine to keep a
finished sequence's KV for its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moeserve.server.engine.events import (
    DeltaEvent,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    TokenLogprob,
)
from moeserve.server.engine.sampling import TokenSample
from moeserve.server.engine.scheduler import Scheduler
from moeserve.server.engine.sequence import FinishReason, Sequence, check_stop
from moeserve.server.text.tokenizer import StopMatcher, StreamingDetokenizer, Tokenizer

if TYPE_CHECKING:  # a hit is carried for the engine, never looked into here
    from moeserve.server.engine.prompt_cache import Hit

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """The asyncio side of one request, as seen from the engine thread."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[list[Event]]
    open_choices: int
    hit: Hit | None = None  # the prompt-cache hit this request reuses (pinned until it leaves)
    open_seqs: int = 0  # sequences still known to the scheduler
    failed: bool = False  # an ErrorEvent was sent; the request's other output is dropped

    def post(self, events: list[Event]) -> None:
        """Hand events to the request's event loop (thread-safe; a closed loop is ignored).

        Args:
            events: What to deliver, in order.
        """
        # A closed event loop means the client is gone and nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, events)


@dataclass
class SeqOutput:
    """One sequence's text assembly: detokenizer, stop strings and the delta not yet sent."""

    seq: Sequence
    client: RequestOutput
    detok: StreamingDetokenizer
    stops: StopMatcher
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def take_delta(self) -> list[Event]:
        """The buffered delta as an event (none when nothing is buffered), buffers emptied."""
        text = "".join(self.text)
        if not text and not self.ids:
            return []
        event = DeltaEvent(self.seq.index, text, self.ids, self.logprobs or None)
        self.text, self.ids, self.logprobs = [], [], []
        return [event]


class OutputProcessor:
    """Detokenises, decides stops and assembles events for every running sequence.

    Args:
        tokenizer: The served model's tokenizer.
        scheduler: Told when a sequence ends and when a failed request must leave.
        remember: Keeps a sequence that finished normally for its session's next turn.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        scheduler: Scheduler,
        remember: Callable[[Sequence, GenerationRequest], None],
    ) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._remember = remember
        self.outputs: dict[str, SeqOutput] = {}  # seq_id -> output state

    def add(self, client: RequestOutput, seqs: list[Sequence]) -> None:
        """Start assembling the output of a request's admitted sequences.

        Args:
            client: The request's event side.
            seqs: Its sequences, one per choice.
        """
        req = client.request
        for seq in seqs:
            detok = self.tokenizer.detokenizer(req.keep_special_ids)
            self.outputs[seq.seq_id] = SeqOutput(seq, client, detok, StopMatcher(req.params.stop))

    def process(self, changed: list[Sequence], samples: dict[str, TokenSample]) -> None:
        """Take one step's sampled tokens: text, logprobs, stop decisions, final events.

        Args:
            changed: Sequences that received a token (``Scheduler.update``'s answer).
            samples: The sampled tokens, by ``seq_id``.
        """
        for seq in changed:
            out = self.outputs[seq.seq_id]
            try:
                self._on_token(out, samples[seq.seq_id])
            except Exception as e:
                logger.exception("request %s failed on the engine", out.client.request.request_id)
                self.fail(out, f"the request failed while producing output ({e})")

    def release(self, seq: Sequence) -> RequestOutput | None:
        """Forget a sequence that left the scheduler; an aborted one gets its final event.

        Args:
            seq: From ``StepPlan.released``.

        Returns:
            Its request, or None when it was never known here.
        """
        out = self.outputs.pop(seq.seq_id, None)
        if out is None:
            return None
        if seq.finish_reason is FinishReason.ABORT:
            try:
                self._finish(out)
            except Exception as e:
                self.fail(out, f"the request failed while producing output ({e})")
        return out.client

    def flush(self) -> None:
        """Post each live sequence's buffered delta (one cross-thread call per sequence)."""
        for out in self.outputs.values():
            if not out.client.failed and not out.seq.is_finished and (events := out.take_delta()):
                out.client.post(events)

    def fail(self, out: SeqOutput, message: str) -> None:
        """End one request with an ErrorEvent and abort all its choices; the engine goes on.

        Args:
            out: Any sequence of the request.
            message: Safe to show the client.
        """
        client = out.client
        if client.failed:
            return
        logger.warning("request %s failed: %s", client.request.request_id, message)
        client.failed = True
        client.post([ErrorEvent(message)])
        self.scheduler.abort(client.request.request_id)

    def fail_all(self, message: str) -> None:
        """Send every request in flight one ErrorEvent (the engine itself failed).

        Args:
            message: Safe to show the clients.
        """
        clients = {id(o.client): o.client for o in self.outputs.values()}
        for client in clients.values():
            client.post([ErrorEvent(message)])
        self.outputs.clear()

    # ----- one token --------------------------------------------------------------------------

    def _on_token(self, out: SeqOutput, sample: TokenSample) -> None:
        seq = out.seq
        if out.client.failed:
            return
        if seq.matcher is not None and not seq.matcher.consume(sample.token):
            self.fail(out, seq.matcher.error or "constrained decoding failed")
            return
        eos = seq.is_eos(sample.token)
        stopped = False
        if not eos:  # EOS ends the choice and is never shown
            out.ids.append(sample.token)
            if sample.logprob is not None:
                out.logprobs.append(self._logprob(sample))
            text, stopped = out.stops.feed(out.detok.add(sample.token))
            out.text.append(text)
        reason = check_stop(seq, eos=eos, stop_string=stopped)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._finish(out)

    def _finish(self, out: SeqOutput) -> None:
        """Release held-back text and post the choice's last delta and its FinishEvent."""
        seq = out.seq
        if out.client.failed:  # the request already ended with its ErrorEvent
            return
        if seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._remember(seq, out.client.request)
        if not out.stops.stopped:
            out.text.append(out.stops.feed(out.detok.flush())[0])
            out.text.append(out.stops.flush())
        events = out.take_delta()
        reason = seq.finish_reason.value if seq.finish_reason else "stop"
        events.append(
            FinishEvent(seq.index, reason, len(seq.prompt_ids), len(seq.output_ids), seq.num_cached)
        )
        out.client.post(events)

    def _logprob(self, sample: TokenSample) -> TokenLogprob:
        text = self.tokenizer.decode
        top = [(t, text([t], skip_special_tokens=False), lp) for t, lp in sample.top]
        token_text = text([sample.token], skip_special_tokens=False)
        return TokenLogprob(sample.token, token_text, sample.logprob, top)
