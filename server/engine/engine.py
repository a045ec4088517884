"""The engine: one thread that owns all MLX work, and its asyncio front door.

``Engine.generate(request)`` is an async iterator of events for one request; ``abort``
cancels one; ``call`` runs a small function on the engine thread (the admin routes read the
prompt cache that way). All three post typed messages (``server.engine.inbox``) to one
inbox. The engine thread loops: take the inbox (admissions, aborts, calls), then ``step``:

    plan = scheduler.schedule()                       who prefills, who decodes, who leaves
    result = runner.step(plan)                        model -> sampler -> token ids
    changed = scheduler.update(plan, result.tokens())
    output.process(changed, result.samples)          text, check_stop, events
    collect(plan.released)                            final events, unpin cache hits

Only plain Python data crosses between the two sides. Text and stop decisions live in
``server.engine.output``; every finish reason in ``sequence.check_stop``.

Nothing a request carries can stop the engine thread. Per-request work on it (admission,
grammar matchers, prompt-cache lookup and store, detokenising, stop strings) fails only that
request: refused at admission (the exception surfaces from ``submit``), or ended with one
``ErrorEvent`` once running. A prompt-cache lookup that fails is a miss, and a store that
fails loses only the entry (``Engine`` inherits these guarded prompt-cache hooks from
``server.engine.cache_hooks``). Only a failure of the batch itself (the model, the runner)
stops the thread: then every request in flight gets an ``ErrorEvent``, later requests are
refused with ``EngineDeadError``, and ``healthy`` turns false: nothing hangs.

A request with a ``constraint`` gets one grammar ``Matcher`` per choice at admission; the
runner masks its rows and the output processor advances it (see ``Sequence.banned_ids`` for
why ``min_tokens`` and ``ignore_eos`` yield to a grammar).

It knows token ids, text and events; it does not know HTTP, chat templates or OpenAI shapes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

from moeserve.models.base import LanguageModel
from moeserve.server.engine.cache_hooks import PromptCacheHooks
from moeserve.server.engine.events import ErrorEvent, Event, FinishEvent, GenerationRequest
from moeserve.server.engine.grammar import GrammarCompiler, Matcher
from moeserve.server.engine.inbox import Abort, Admit, Call, Message, Stop
from moeserve.server.engine.output import OutputProcessor, RequestOutput
from moeserve.server.engine.prompt_cache import PromptCache
from moeserve.server.engine.runner import Runner
from moeserve.server.engine.sampling import fresh_generator
from moeserve.server.engine.scheduler import KVBudget, Scheduler, SchedulerConfig
from moeserve.server.engine.sequence import Sequence
from moeserve.server.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread is not running; the API answers 503."""


class Engine(PromptCacheHooks):
    """Continuous-batching generation on a dedicated thread.

    Args:
        model: A model satisfying ``models.base.LanguageModel``.
        tokenizer: The model's tokenizer.
        config: Scheduler limits.
        prompt_cache: Sessions' KV caches, reused across turns.
        kv_cache_max_bytes: Bound on running sequences' cache memory (None: only the count).
        kv_cache_bits: Quantize positional cache tensors to 8 or 4 bits (None: off).
        grammar: Compiles constraints (``engine.grammar.json_schema(...)`` from any thread);
            one for ``tokenizer`` is made when not given.
        runner: A runner made by the caller (a distributed rank's); None makes one from
            ``model``, ``kv_cache_max_bytes`` and ``kv_cache_bits``.
    """

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        config: SchedulerConfig,
        prompt_cache: PromptCache | None = None,
        grammar: GrammarCompiler | None = None,
        kv_cache_max_bytes: int | None = None,
        kv_cache_bits: int | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.grammar = grammar or GrammarCompiler(tokenizer)
        self.prompt_cache = prompt_cache
        self.config = config
        self.runner = runner or Runner(model, max_bytes=kv_cache_max_bytes, kv_bits=kv_cache_bits)
        budget = None
        if kv_cache_max_bytes is not None:
            budget = KVBudget(self.runner.store.layout, kv_cache_max_bytes)
        self.scheduler = Scheduler(config, budget)
        self.output = OutputProcessor(tokenizer, self.scheduler, self._remember)
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.prompt_cache_bytes = 0
        self.kv_cache_bytes = 0  # published after each step (plain ints, for other threads)
        self.kv_cache_tokens = 0
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
        self.grammar.prebuild()  # the llguidance tokenizer takes seconds at 150k tokens

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step.

        Args:
            timeout: Seconds to wait for it.
        """
        self._stopping = True
        self._inbox.put(Stop())
        if self._thread is not None:
            self._thread.join(timeout)

    async def submit(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
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
        client = RequestOutput(request, asyncio.get_running_loop(), asyncio.Queue(), request.n)
        admitted: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._inbox.put(Admit(client, admitted))
        if self.error is not None:  # died before taking our item (see _run for the order)
            raise EngineDeadError("the generation engine is not running")
        await asyncio.wrap_future(admitted)
        return self._events(client)

    async def _events(self, client: RequestOutput) -> AsyncGenerator[Event, None]:
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

    async def call(self, fn: Callable[[], T]) -> T:
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
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._inbox.put(Call(fn, done))
        return await asyncio.wrap_future(done)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slot and cache are freed at the next step.

        Args:
            request_id: The request to cancel.
        """
        self._inbox.put(Abort(request_id))

    def stats(self) -> dict[str, int]:
        """Queue sizes and prompt-cache memory for health and metrics (approximate, lock-free).

        Returns:
            ``running``, ``waiting``, ``prompt_cache_bytes``, ``kv_cache_bytes`` (allocated for
            running sequences), ``kv_cache_tokens`` (positions they hold) and ``preemptions``.
        """
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "prompt_cache_bytes": self.prompt_cache_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_cache_tokens": self.kv_cache_tokens,
            "preemptions": self.scheduler.preemptions,
        }

    # ----- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            fresh_generator()  # this thread's own noise, not every new thread's same sequence
            while not self._stopping:
                self._drain_inbox(block=not self.scheduler.has_work)
                if self.scheduler.has_work and not self._stopping:
                    self.step()
            if self.prompt_cache is not None:
                self._persist_at_shutdown(self.prompt_cache)
        except BaseException as e:  # the engine must never die silently
            logger.exception("engine thread died")
            self.error = e  # set before draining the inbox, so submit() cannot miss both
            self._fail_everyone(f"the generation engine failed: {e}")

    def step(self) -> None:
        """One step: schedule, run the model and sample, turn tokens into events, collect."""
        plan = self.scheduler.schedule()
        start = time.perf_counter()
        result = self.runner.step(plan)
        self.scheduler.observe(plan, time.perf_counter() - start)  # learns what steps cost
        changed = self.scheduler.update(plan, result.tokens())
        self.output.process(changed, result.samples)
        self._collect(plan.released)
        self.kv_cache_bytes = self.runner.store.nbytes
        self.kv_cache_tokens = self.runner.store.tokens
        self.steps += 1

    def _collect(self, released: list[Sequence]) -> None:
        """Send what finished, unpin prompt-cache hits of requests that left, flush deltas."""
        for seq in released:
            client = self.output.release(seq)
            if client is not None:
                client.open_seqs -= 1
                if client.open_seqs == 0:
                    self._release(client.hit)
        self.output.flush()
        if self.prompt_cache is not None:
            # Published as a plain int: the metrics scrape reads it from another thread.
            self.prompt_cache_bytes = self.prompt_cache.nbytes

    def _drain_inbox(self, block: bool) -> None:
        message = self._inbox.get() if block else self._next_message()
        while message is not None:
            self._handle(message)
            message = self._next_message()

    def _handle(self, message: Message) -> None:
        if isinstance(message, Abort):
            self.scheduler.abort(message.request_id)
        elif isinstance(message, Call):
            message.run()
        elif isinstance(message, Admit):
            self._admit(message.client, message.admitted)

    def _next_message(self) -> Message | None:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _admit(self, client: RequestOutput, admitted: concurrent.futures.Future[None]) -> None:
        if not admitted.set_running_or_notify_cancel():
            return  # the client left while it waited in the inbox
        req = client.request
        hit, queued = None, False
        try:
            eos = frozenset(self.tokenizer.eos_token_ids) | frozenset(req.params.stop_token_ids)
            seqs = [
                Sequence(
                    req.request_id,
                    i,
                    list(req.prompt_ids),
                    req.params,
                    eos_ids=eos,
                    matcher=self._matcher(req),
                )
                for i in range(req.n)
            ]
            hit = self._lookup(req)
            reuse = 0
            if hit is not None:  # what this model's cache kinds can resume, below the prompt
                reuse = self._reusable(hit, min(hit.length, len(req.prompt_ids) - 1))
            for seq in seqs:
                seq.num_cached = reuse
            self.scheduler.add(seqs)
            queued = True
            for seq in seqs:
                if seq.num_cached:
                    self.runner.adopt_prefix(seq, hit.entry.kv)
            self.output.add(client, seqs)
        except Exception as e:  # refused: the caller raises it as the matching HTTP error
            if queued:  # its sequences leave (and free runner state) at the next step
                self.scheduler.abort(req.request_id)
            self._release(hit)
            admitted.set_exception(e)
            return
        client.hit, client.open_seqs = hit, len(seqs)
        admitted.set_result(None)

    def _matcher(self, request: GenerationRequest) -> Matcher | None:
        """A fresh grammar matcher for one choice (GrammarError refuses the request)."""
        return None if request.constraint is None else self.grammar.matcher(request.constraint)

    def _fail_everyone(self, message: str) -> None:
        self.output.fail_all(message)
        while (item := self._next_message()) is not None:
            done = getattr(item, "admitted", None) or getattr(item, "done", None)
            if done is not None and done.set_running_or_notify_cancel():
                done.set_exception(EngineDeadError(message))
