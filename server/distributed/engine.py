"""One scheduler for all ranks: rank 0's engine broadcasts each step; the others replay it.

Rank 0 runs the ordinary ``Engine`` (HTTP, admission, the scheduler, sampling, grammar,
the prompt cache), with two changes (``DistributedEngine``):

- before each forward pass, its runner (``RecordingRunner.step``) broadcasts the step
  (``wire.Message``): the runner's ``StepWork`` and the prompt-cache operations since the
  last step. Every other rank
  (``follow``) runs the same passes on its shard in the same order. Sampling happens on rank
  0 alone; the tokens it chose reach the others as the next step's decode tokens.
- the runner (``RecordingRunner``) notes each prompt-cache snapshot and adoption under a key
  that the other ranks use for their own part of the entry; when rank 0's entry is gone (its
  snapshot is garbage-collected) a ``drop`` goes out too. With ``--prompt-cache-dir``, the
  prompt cache tells the engine of each session file it queues or deletes, and the other
  ranks write or delete their part under the same name (``rank_cache``).
- where the answer depends on every rank, rank 0 asks (``ask``: an ``ask`` message, then
  ``Link.gather_ints``): loading a session from disk is a hit only if every rank loaded its
  part (else a miss on every rank), and a hit resumes at the longest prefix that every rank's
  layers can resume (a recurrent layer only at the turn boundaries it saved, a sliding one
  only while it holds the window), agreed in as many rounds as it takes (usually one).

When it runs out of work, rank 0 sends an idle ``ping`` at once (the other ranks then sleep
on the doorbell rather than spin in the collective; ``doorbell``), and another every
``heartbeat`` seconds while idle, so a dead rank is noticed without a request, and the
others' wait for the next message can time out too; operations left by the last step (a
session's ``save``) or by an admin route (a ``delete``) go out at once in a ping of their
own rather than with the next step. When rank 0's
engine fails (a collective raised: a peer is gone) it fails every stream as a single engine
does, logs which rank is exiting, and stops the process (``Link``'s exit path). It knows
the engine's and the runner's seams; it does not know HTTP.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import mlx.core as mx

from moeserve.models.cache import Snapshot
from moeserve.server.distributed.link import EXIT_GRACE_SECONDS, STARTUP_SECONDS, Link
from moeserve.server.distributed.rank_cache import RankEntries, tokens_digest
from moeserve.server.distributed.wire import ASK, PING, STEP, STOP, Message
from moeserve.server.engine import kv_io
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import GenerationRequest
from moeserve.server.engine.prompt_cache import Entry, Hit
from moeserve.server.engine.runner import Runner, StepResult, StepWork
from moeserve.server.engine.scheduler import StepPlan
from moeserve.server.engine.sequence import Sequence

logger = logging.getLogger("moeserve.distributed")

# Seconds the process gives the HTTP drain after the engine failed, before a hard exit.
HARD_EXIT_SECONDS = 20.0


class RecordingRunner(Runner):
    """Rank 0's runner: broadcasts each step first; notes what the others must repeat.

    The notes are the prompt-cache snapshots and adoptions (and drops) since the last step.

    Args:
        *args: As ``Runner``.
        link: The group.
        **kwargs: As ``Runner``.
    """

    def __init__(self, *args: Any, link: Link, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.link = link
        self.ops: list[list[Any]] = []
        self.dropped: list[int] = []  # appended by finalizers (any thread; list.append is atomic)
        self._keys = itertools.count(1)

    def step(self, plan: StepPlan) -> StepResult:
        """Broadcast the step (its work and the operations since the last), then run it.

        Args:
            plan: From ``Scheduler.schedule()``.

        Returns:
            The sampled tokens.
        """
        self.link.broadcast(Message(STEP, StepWork.from_plan(plan), self.take_ops()).encode())
        self.link.stats.steps += 1
        return super().step(plan)

    def snapshot(self, seq_id: str) -> Snapshot | None:
        """``Runner.snapshot``, keyed so that every rank keeps its own part of it."""
        snap = super().snapshot(seq_id)
        if snap is not None:
            self.ops.append(["snap", seq_id, self.key(snap)])
        return snap

    def key(self, snap: Snapshot) -> int:
        """Give an entry's snapshot the key the other ranks file their part under.

        Args:
            snap: Rank 0's part (taken or loaded from disk).

        Returns:
            The key; a ``drop`` of it goes out once ``snap`` is garbage-collected.
        """
        key = next(self._keys)
        snap.dist_key = key  # type: ignore[attr-defined]
        weakref.finalize(snap, self.dropped.append, key)
        return key

    def adopt_prefix(self, seq: Sequence, snap: Snapshot) -> None:
        """``Runner.adopt_prefix``; the other ranks adopt their part of the same entry."""
        super().adopt_prefix(seq, snap)
        self.ops.append(["adopt", seq.seq_id, snap.dist_key, seq.num_computed])  # type: ignore[attr-defined]

    def take_ops(self) -> list[list[Any]]:
        """The operations since the last call, drops last, and forget them."""
        ops, self.ops = self.ops, []
        while self.dropped:
            ops.append(["drop", self.dropped.pop(0)])
        return ops


class DistributedEngine(Engine):
    """Rank 0's engine (see the module docstring).

    Args:
        *args: As ``Engine``.
        link: The group.
        heartbeat: Idle seconds between pings.
        **kwargs: As ``Engine`` (``runner`` is made here).
    """

    def __init__(self, *args: Any, link: Link, heartbeat: float, **kwargs: Any) -> None:
        model = args[0]
        runner = RecordingRunner(
            model,
            link=link,
            max_bytes=kwargs.get("kv_cache_max_bytes"),
            kv_bits=kwargs.get("kv_cache_bits"),
        )
        super().__init__(*args, runner=runner, **kwargs)
        self.runner: RecordingRunner = runner
        self.link = link
        self.heartbeat = heartbeat
        link.watchdog.on_timeout = self._timed_out
        if self.prompt_cache is not None:  # the other ranks follow its files
            self.prompt_cache.load = self._load_entry
            self.prompt_cache.saved = self._saved
            self.prompt_cache.discarded = self._discarded

    def ask(self, question: list[Any], mine: int) -> list[int]:
        """Put a question (``wire``) to every rank, with the operations still to send first.

        Args:
            question: ``("load", ...)`` or ``("usable", ...)``.
            mine: Rank 0's own answer.

        Returns:
            Every rank's answer, by rank.
        """
        ops = [*self.runner.take_ops(), question]
        self.link.broadcast(Message(ASK, ops=ops).encode())
        rows = self.link.gather_ints([mine], "the answer to a prompt-cache question", None)
        return [row[0] for row in rows]

    def _drain_inbox(self, block: bool) -> None:
        if block:  # idle: wait for work, pinging the other ranks meanwhile
            self._idle_ping()
            try:
                self._handle(self._inbox.get(timeout=self.heartbeat))
            except queue.Empty:
                self.link.broadcast(Message(PING, ops=self.runner.take_ops()).encode(), idle=True)
                return
        super()._drain_inbox(block=False)

    def _idle_ping(self) -> None:
        """Going idle: send what the last step or an admin route left, and let the others sleep.

        An idle ping sends the other ranks to the doorbell instead of a spinning collective;
        once they are there, only new operations need one.
        """
        ops = self.runner.take_ops()
        if ops or not self.link.asleep:
            self.link.broadcast(Message(PING, ops=ops).encode(), idle=True)

    def _lookup(self, request: GenerationRequest) -> Hit | None:
        hit = super()._lookup(request)
        if hit is not None and getattr(hit.entry.kv, "dist_key", None) is None:
            self._release(hit)  # an entry the other ranks never saw: recompute instead
            return None
        return hit

    def _reusable(self, hit: Hit, shared: int) -> int:
        """The longest prefix every rank can resume: asked until every rank agrees.

        A rank answers at most what it was asked; the smallest answer is asked again until
        every rank gives it back (a sliding layer may refuse a shorter prefix it would take).
        """
        key, length = hit.entry.kv.dist_key, shared
        while True:
            answers = self.ask(["usable", key, length], super()._reusable(hit, length))
            length = min(answers)
            if max(answers) == length:
                return length

    def _load_entry(self, path: Path) -> tuple[list[int], Snapshot, int, dict[str, str]]:
        """``PromptCache.load``: rank 0's part, then every other rank's, or a miss for all.

        Raises:
            LookupError: A rank could not load its part (the prompt cache logs a miss).
        """
        tokens, snap, nbytes, meta = kv_io.load(path)
        question = ["load", self.runner.key(snap), path.name, tokens_digest(tokens)]
        answers = self.ask(question, 1)
        if min(answers) == 0:
            missing = [rank for rank, ok in enumerate(answers) if not ok]
            raise LookupError(f"rank(s) {missing} could not load their part")
        return tokens, snap, nbytes, meta

    def _saved(self, entry: Entry, path: Path) -> None:
        """``PromptCache.saved``: the other ranks write their part under the same name."""
        self.runner.ops.append(["save", entry.kv.dist_key, path.name, entry.tokens])

    def _discarded(self, path: Path) -> None:
        """``PromptCache.discarded``: the other ranks delete their part too."""
        self.runner.ops.append(["delete", path.name])

    def _run(self) -> None:
        super()._run()
        if self.error is None:
            try:  # a clean stop: let the other ranks leave their loop too (shutdown's saves)
                self.link.broadcast(Message(STOP, ops=self.runner.take_ops()).encode())
            except Exception:
                logger.exception("rank 0: could not tell the other ranks to stop")
            logger.info("%s", self.link.stats.describe(0))
            return
        message = f"rank 0: the distributed engine failed ({self.error}); exiting"
        logger.error("%s", message)
        _exit_soon()

    def _timed_out(self, message: str) -> None:
        """Watchdog: the engine thread is stuck in a collective; fail the streams from here."""
        self.error = TimeoutError(message)
        self._fail_everyone(message)


def _exit_soon() -> None:
    """Stop this server: the HTTP drain ends the streams; a hard exit bounds it."""

    def hard_exit() -> None:
        time.sleep(HARD_EXIT_SECONDS)
        os._exit(1)

    threading.Thread(target=hard_exit, daemon=True).start()
    time.sleep(EXIT_GRACE_SECONDS)  # the error events reach their clients first
    os.kill(os.getpid(), signal.SIGTERM)


def follow(runner: Runner, link: Link, cache: RankEntries | None = None) -> int:
    """A rank other than 0: replay rank 0's steps on this rank's shard until told to stop.

    Args:
        runner: A runner over this rank's part of the model.
        link: The group.
        cache: This rank's part of the prompt cache (default: in memory only).

    Returns:
        The process exit status (0: rank 0 stopped cleanly; 1: the group failed).
    """
    cache = cache or RankEntries(runner)
    try:
        return _follow(runner, link, cache)
    finally:
        cache.close()


def _follow(runner: Runner, link: Link, cache: RankEntries) -> int:
    wait: float | None = STARTUP_SECONDS  # rank 0 may still be starting its HTTP server
    while True:
        try:
            message = Message.decode(link.broadcast(None, wait))
            wait = None
        except RuntimeError as e:  # a peer closed its sockets: rank 0 is gone or failing
            logger.error("rank %d: lost the group (%s); exiting", link.rank, e)
            return 1
        try:
            _replay(runner, link, message, cache)
        except Exception as e:  # the ranks no longer agree; rank 0 fails when this one leaves
            logger.exception("rank %d: a step failed (%s); exiting", link.rank, e)
            return 1
        if message.kind == STOP:
            logger.info("rank %d: rank 0 stopped; exiting", link.rank)
            logger.info("%s", link.stats.describe(link.rank))
            return 0
        if message.kind == STEP:
            link.stats.steps += 1


def _replay(runner: Runner, link: Link, message: Message, cache: RankEntries) -> None:
    """Repeat rank 0's prompt-cache operations, then run the step's passes or answer."""
    ops = message.ops[:-1] if message.kind == ASK else message.ops
    for op in ops:
        cache.apply(op)
    if message.kind == ASK:
        question = message.ops[-1]
        rows = link.gather_ints([cache.answer(question)], "the answers to rank 0", None)
        cache.settle(question, [row[0] for row in rows])
    elif message.kind == STEP:
        outputs, _ = runner.forward(message.work)
        mx.eval(outputs)
