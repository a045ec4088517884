"""The engine: one thread that owns all MLX work, and its asyncio front door.

``Engine.generate(request)`` is an async iterator of events for one request; ``abort``
cancels one. Behind them a single engine thread loops: take new requests and aborts from
its inbox, ``scheduler.schedule()``, ``runner.step(plan)``, ``scheduler.update``, then turn
sampled tokens into text (detokenizer, EOS, stop strings) and post events back to each
request's event loop. Only plain Python data crosses between the two sides.

Nothing a request carries can stop the engine thread. Per-request work on it (admission,
grammar matchers, prompt-cache lookup and store, detokenising, stop strings) fails only that
request: refused at admission (the exception surfaces from ``submit``), or ended with one
``ErrorEvent`` once running. A prompt-cache lookup that fails is a miss, and a store that
fails loses only the entry. Only a failure of the batch itself (the model, the runner) stops
the thread: then every request in flight gets an ``ErrorEvent``, later requests are refused
with ``EngineDeadError``, and ``healthy`` turns false: nothing hangs.

A request with a ``constraint`` gets one grammar ``Matcher`` per choice at admission. Its rows
are masked to what the grammar allows, advance the matcher with each sampled token, and stop
with "stop" once the grammar is complete. For them EOS always ends the choice (``ignore_eos``
does not apply) and ``min_tokens`` never bans EOS: the grammar decides when the output may end,
and a ban on the only token it allows would leave nothing to sample. A matcher that fails
fails only its request (one ``ErrorEvent``), never the engine.

It knows token ids, text and events; it does not know HTTP, chat templates or OpenAI shapes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.engine import kv_io
from server.engine.events import (
    DeltaEvent,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    TokenLogprob,
)
from server.engine.grammar import GrammarCompiler, Matcher
from server.engine.runner import Runner
from server.engine.sampling import SamplerRow, TokenSample
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import FinishReason, Sequence
from server.prompt_cache import Hit, PromptCache
from server.tokenizer import StopMatcher, StreamingDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread is not running; the API answers 503."""


@dataclass
class _Client:
    """The asyncio side of one request, as seen from the engine thread."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    open_choices: int
    hit: Hit | None = None  # the prompt-cache entry this request reuses (pinned)
    open_seqs: int = 0  # sequences still holding runner state
    failed: bool = False  # an ErrorEvent was sent; the request's other output is dropped

    def post(self, events: list[Event]) -> None:
        # A closed event loop means the client is gone and nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, events)


@dataclass
class _Call:
    """A function to run on the engine thread, with the future that carries its result."""

    fn: object
    done: concurrent.futures.Future

    def run(self) -> None:
        if not self.done.set_running_or_notify_cancel():
            return  # the caller went away (a cancelled future refuses any result)
        try:
            self.done.set_result(self.fn())
        except Exception as e:  # handed to the caller, never kills the engine
            self.done.set_exception(e)


@dataclass
class _Stream:
    """Engine-thread state of one sequence: text assembly and sampler history."""

    seq: Sequence
    client: _Client
    detok: StreamingDetokenizer
    stops: StopMatcher
    row: SamplerRow
    eos: frozenset[int]
    matcher: Matcher | None = None  # grammar state of a constrained choice
    pending_text: list[str] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    pending_lp: list[TokenLogprob] = field(default_factory=list)


class Engine:
    """Continuous-batching generation on a dedicated thread.

    Args:
        model: A model satisfying ``models.base.LanguageModel``.
        tokenizer: The model's tokenizer.
        config: Scheduler limits.
        prompt_cache: Sessions' KV caches, reused across turns.
        grammar: Compiles constraints (``engine.grammar.json_schema(...)`` from any thread);
            one for ``tokenizer`` is made when not given.
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        config: SchedulerConfig,
        prompt_cache: PromptCache | None = None,
        grammar: GrammarCompiler | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.grammar = grammar or GrammarCompiler(tokenizer)
        self.prompt_cache = prompt_cache
        self.config = config
        self.scheduler = Scheduler(config)
        self.runner = Runner(model)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # seq_id -> stream
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.prompt_cache_bytes = 0
        self.steps = 0

    # ----- asyncio side ---------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Whether the engine thread is alive and accepting work."""
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._run, name="moeserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step.

        Args:
            timeout: Seconds to wait for it.
        """
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    async def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Admit a request and return the iterator of its events.

        Admission errors surface here, before any event, so that an HTTP layer can still
        answer with a status code. The caller must iterate the result to the end or call
        ``abort``: an iterator that is closed early aborts the request itself.

        Args:
            request: The tokenised request.

        Returns:
            An async iterator of ``DeltaEvent`` / ``FinishEvent`` per choice, or one
            ``ErrorEvent``.

        Raises:
            EngineDeadError: The engine is not running.
            QueueFullError, ContextLengthError, ValueError: Refused at admission.
        """
        if not self.healthy:
            raise EngineDeadError("the generation engine is not running")
        client = _Client(request, asyncio.get_running_loop(), asyncio.Queue(), request.n)
        admitted: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((client, admitted))
        if self.error is not None:  # died before taking our item (see _run for the order)
            raise EngineDeadError("the generation engine is not running")
        await asyncio.wrap_future(admitted)
        return self._events(client)

    async def _events(self, client: _Client) -> AsyncIterator[Event]:
        finished = False
        try:
            while not finished:
                for event in await client.events.get():
                    if isinstance(event, FinishEvent):
                        client.open_choices -= 1
                    finished = client.open_choices == 0 or isinstance(event, ErrorEvent)
                    yield event
        finally:
            if not finished:
                self.abort(client.request.request_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Submit a request and yield its events until every choice finished.

        Leaving the iteration early (a client disconnect) aborts the request.

        Args:
            request: The tokenised request.

        Yields:
            ``DeltaEvent`` / ``FinishEvent`` per choice, or one ``ErrorEvent``.
        """
        events = await self.submit(request)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    async def call(self, fn):
        """Run ``fn()`` on the engine thread between steps and return its result.

        State the engine thread owns (the prompt cache) is only touched there, so admin
        routes go through this instead of locking.

        Args:
            fn: A quick, plain-Python callable.

        Returns:
            Whatever ``fn`` returns.
        """
        if not self.healthy:
            raise EngineDeadError("the generation engine is not running")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Call(fn, done))
        return await asyncio.wrap_future(done)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slot and cache are freed at the next step.

        Args:
            request_id: The request to cancel.
        """
        self._inbox.put(request_id)

    def stats(self) -> dict[str, int]:
        """Queue sizes and prompt-cache memory for health and metrics (approximate, lock-free).

        Returns:
            ``{"running": ..., "waiting": ..., "prompt_cache_bytes": ...}``.
        """
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "prompt_cache_bytes": self.prompt_cache_bytes,
        }

    # ----- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox(block=not self.scheduler.has_work)
                if self.scheduler.has_work and not self._stopping:
                    self._step()
            if self.prompt_cache is not None:
                self._persist_at_shutdown()
        except BaseException as e:  # the engine must never die silently
            logger.exception("engine thread died")
            self.error = e  # set before draining the inbox, so generate() cannot miss both
            self._fail_everyone(f"the generation engine failed: {e}")

    def _persist_at_shutdown(self) -> None:
        """Write the sessions not yet on disk and wait for the writer (a directory is set)."""
        try:
            self.prompt_cache.shutdown()
        except Exception:  # the engine stopped cleanly; only unsaved sessions are lost
            logger.exception("prompt cache: could not persist sessions at shutdown")

    def _drain_inbox(self, block: bool) -> None:
        item = self._inbox.get() if block else self._next_item()
        while item is not None or not self._inbox.empty():
            if isinstance(item, str):
                self.scheduler.abort(item)
            elif isinstance(item, _Call):
                item.run()
            elif item is not None:
                self._admit(*item)
            item = self._next_item()

    def _next_item(self):
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _admit(self, client: _Client, admitted: concurrent.futures.Future) -> None:
        if not admitted.set_running_or_notify_cancel():
            return  # the client left while it waited in the inbox
        req = client.request
        hit, queued = None, False
        try:
            seqs = [
                Sequence(req.request_id, i, list(req.prompt_ids), req.params) for i in range(req.n)
            ]
            matchers = [self._matcher(req) for _ in seqs]
            hit = self._lookup(req)
            for seq in seqs:
                seq.num_cached = hit.length if hit else 0
            eos = frozenset(self.tokenizer.eos_token_ids) | frozenset(req.params.stop_token_ids)
            streams = []
            for seq, matcher in zip(seqs, matchers):
                row = SamplerRow(req.params, seq.output_ids, seq.prompt_ids, choice=seq.index)
                stops = StopMatcher(req.params.stop)
                detok = self.tokenizer.detokenizer(req.keep_special_ids)
                streams.append(_Stream(seq, client, detok, stops, row, eos, matcher))
            self.scheduler.add(seqs)  # caps num_cached below the prompt length
            queued = True
            for seq in seqs:
                if seq.num_cached:
                    self.runner.adopt_prefix(seq, kv_io.restore(hit.entry.kv, seq.num_cached))
        except Exception as e:  # refused: the caller raises it as the matching HTTP error
            if queued:  # its sequences leave (and free runner state) at the next step
                self.scheduler.abort(req.request_id)
            self._release(hit)
            admitted.set_exception(e)
            return
        client.hit, client.open_seqs = hit, len(seqs)
        for stream in streams:
            self._streams[stream.seq.seq_id] = stream
        admitted.set_result(None)

    def _lookup(self, request: GenerationRequest) -> Hit | None:
        """The prompt-cache hit for a request; a lookup that fails is only a miss."""
        if self.prompt_cache is None:
            return None
        try:
            return self.prompt_cache.lookup(
                request.cache_scope, request.session_key, request.prompt_ids
            )
        except Exception:
            logger.exception("prompt-cache lookup failed for %s; no reuse", request.request_id)
            return None

    def _release(self, hit: Hit | None) -> None:
        """Unpin a prompt-cache hit; a failure there (eviction, a write) costs no request."""
        if hit is None or self.prompt_cache is None:
            return
        try:
            self.prompt_cache.release(hit)
        except Exception:
            logger.exception("prompt-cache release failed")

    def _matcher(self, request: GenerationRequest) -> Matcher | None:
        """A fresh grammar matcher for one choice (GrammarError refuses the request)."""
        return None if request.constraint is None else self.grammar.matcher(request.constraint)

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        rows, matchers = {}, {}
        for s in [c.seq for c in plan.prefills if c.is_last] + plan.decodes:
            stream = self._streams[s.seq_id]
            # The grammar alone decides when a constrained row may end (module docstring).
            free = len(s.output_ids) >= s.params.min_tokens or stream.matcher is not None
            stream.row.banned_ids = frozenset() if free else stream.eos
            stream.row.step = len(s.output_ids)
            rows[s.seq_id] = stream.row
            if stream.matcher is not None:
                matchers[s.seq_id] = stream.matcher
        result = self.runner.step(plan, rows, matchers)
        self.steps += 1
        changed = self.scheduler.update(plan, {k: v.token for k, v in result.samples.items()})
        for seq in changed:
            stream = self._streams[seq.seq_id]
            self._guarded(stream, self._on_token, stream, result.samples[seq.seq_id])
        for seq in plan.released:
            stream = self._streams.pop(seq.seq_id, None)
            if stream is None:
                continue
            if seq.finish_reason is FinishReason.ABORT:
                self._guarded(stream, self._finish, stream)
            stream.client.open_seqs -= 1
            if stream.client.open_seqs == 0:
                self._release(stream.client.hit)
        self._flush_events()
        if self.prompt_cache is not None:
            # Published as a plain int: the metrics scrape reads it from another thread.
            self.prompt_cache_bytes = self.prompt_cache.nbytes

    def _on_token(self, stream: _Stream, sample: TokenSample) -> None:
        seq, params, matcher = stream.seq, stream.seq.params, stream.matcher
        if stream.client.failed:
            return
        if matcher is not None and not matcher.consume(sample.token):
            self._fail_request(stream, matcher.error or "constrained decoding failed")
            return
        if sample.token in stream.eos and (not params.ignore_eos or matcher is not None):
            self._stop(seq)
            self._finish(stream)
            return
        stream.pending_ids.append(sample.token)
        if sample.logprob is not None:
            stream.pending_lp.append(self._logprob(sample))
        text, stopped = stream.stops.feed(stream.detok.add(sample.token))
        stream.pending_text.append(text)
        if stopped or (matcher is not None and matcher.is_done):
            self._stop(seq)
        if seq.is_finished:
            self._finish(stream)

    def _guarded(self, stream: _Stream, fn, *args) -> None:
        """Run one stream's per-token work; whatever it raises fails only its request."""
        try:
            fn(*args)
        except Exception as e:
            logger.exception("request %s failed on the engine", stream.client.request.request_id)
            self._fail_request(stream, f"the request failed while producing output ({e})")

    def _fail_request(self, stream: _Stream, message: str) -> None:
        """End one request with an ErrorEvent and abort its choices; the engine goes on."""
        client = stream.client
        if client.failed:
            return
        logger.warning("request %s failed: %s", client.request.request_id, message)
        client.failed = True
        client.post([ErrorEvent(message)])
        self.scheduler.abort(client.request.request_id)

    def _stop(self, seq: Sequence) -> None:
        """Finish with STOP; it outranks a LENGTH set by update() for the same token."""
        if seq.is_finished:
            seq.finish_reason = FinishReason.STOP
        else:
            self.scheduler.finish(seq, FinishReason.STOP)

    def _logprob(self, sample: TokenSample) -> TokenLogprob:
        text = self.tokenizer.decode
        top = [(t, text([t], skip_special_tokens=False), lp) for t, lp in sample.top]
        token_text = text([sample.token], skip_special_tokens=False)
        return TokenLogprob(sample.token, token_text, sample.logprob, top)

    def _remember(self, stream: _Stream) -> None:
        """Store a finished sequence's KV for its session's next turn (choice 0 only)."""
        seq = stream.seq
        if self.prompt_cache is None or seq.index != 0:
            return
        caches = self.runner.caches_of(seq.seq_id)
        if not caches or caches[0].offset == 0:
            return
        request = stream.client.request
        try:
            kv, nbytes = kv_io.snapshot(caches)
            tokens = seq.all_ids[: caches[0].offset]
            self.prompt_cache.store(request.cache_scope, request.session_key, tokens, kv, nbytes)
        except Exception:  # the output is complete; only the next turn's reuse is lost
            logger.exception("prompt-cache store failed for %s", request.request_id)

    def _finish(self, stream: _Stream) -> None:
        """Release held-back text and queue the choice's FinishEvent."""
        seq = stream.seq
        if stream.client.failed:  # the request already ended with its ErrorEvent
            return
        if seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._remember(stream)
        if not stream.stops.stopped:
            stream.pending_text.append(stream.stops.feed(stream.detok.flush())[0])
            stream.pending_text.append(stream.stops.flush())
        events = self._take_delta(stream)
        events.append(
            FinishEvent(
                seq.index,
                seq.finish_reason.value if seq.finish_reason else "stop",
                len(seq.prompt_ids),
                len(seq.output_ids),
                seq.num_cached,
            )
        )
        stream.client.post(events)

    def _take_delta(self, stream: _Stream) -> list[Event]:
        text = "".join(stream.pending_text)
        if not text and not stream.pending_ids:
            return []
        event = DeltaEvent(stream.seq.index, text, stream.pending_ids, stream.pending_lp or None)
        stream.pending_text, stream.pending_ids, stream.pending_lp = [], [], []
        return [event]

    def _flush_events(self) -> None:
        """Post each live stream's accumulated delta (one cross-thread call per stream)."""
        for stream in self._streams.values():
            if stream.client.failed:
                continue
            if not stream.seq.is_finished and (events := self._take_delta(stream)):
                stream.client.post(events)

    def _fail_everyone(self, message: str) -> None:
        clients = {id(s.client): s.client for s in self._streams.values()}
        for client in clients.values():
            client.post([ErrorEvent(message)])
        self._streams.clear()
        while (item := self._next_item()) is not None:
            done = item[1] if isinstance(item, tuple) else getattr(item, "done", None)
            if done is not None and done.set_running_or_notify_cancel():
                done.set_exception(EngineDeadError(message))
