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
  snapshot is garbage-collected) a ``drop`` goes out too. A hit whose entry has no key (none
  should: disk persistence is refused in distributed mode) is treated as a miss.

While idle, rank 0 sends a ``ping`` every ``heartbeat`` seconds, so a dead rank is noticed
without a request, and the others' wait for the next message can time out too. When rank 0's
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
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from moeserve.models.cache import Snapshot
from moeserve.server.distributed.link import EXIT_GRACE_SECONDS, STARTUP_SECONDS, Link
from moeserve.server.distributed.wire import PING, STEP, STOP, Message
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import GenerationRequest
from moeserve.server.engine.prompt_cache import Hit
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
            key = next(self._keys)
            snap.dist_key = key  # type: ignore[attr-defined]
            weakref.finalize(snap, self.dropped.append, key)
            self.ops.append(["snap", seq_id, key])
        return snap

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
        prefix_reuse: Resume prompt-cache hits (``launch.prefix_reuse_safe``); else recompute.
        **kwargs: As ``Engine`` (``runner`` is made here).
    """

    def __init__(
        self, *args: Any, link: Link, heartbeat: float, prefix_reuse: bool = True, **kwargs: Any
    ) -> None:
        model = args[0]
        runner = RecordingRunner(
            model,
            link=link,
            max_bytes=kwargs.get("kv_cache_max_bytes"),
            kv_bits=kwargs.get("kv_cache_bits"),
        )
        super().__init__(*args, runner=runner, **kwargs)
        self.link = link
        self.heartbeat = heartbeat
        self.prefix_reuse = prefix_reuse
        link.watchdog.on_timeout = self._timed_out

    def _drain_inbox(self, block: bool) -> None:
        if block:  # idle: wait for work, pinging the other ranks meanwhile
            try:
                self._handle(self._inbox.get(timeout=self.heartbeat))
            except queue.Empty:
                self.link.broadcast(Message(PING).encode())
                return
        super()._drain_inbox(block=False)

    def _lookup(self, request: GenerationRequest) -> Hit | None:
        if not self.prefix_reuse:
            return None
        hit = super()._lookup(request)
        if hit is not None and getattr(hit.entry.kv, "dist_key", None) is None:
            self._release(hit)  # an entry the other ranks never saw: recompute instead
            return None
        return hit

    def _run(self) -> None:
        super()._run()
        if self.error is None:
            try:  # a clean stop: let the other ranks leave their loop too
                self.link.broadcast(Message(STOP).encode())
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


@dataclass
class _Adopting:
    """What ``Runner.adopt_prefix`` reads of a sequence."""

    seq_id: str
    num_computed: int


def follow(runner: Runner, link: Link) -> int:
    """A rank other than 0: replay rank 0's steps on this rank's shard until told to stop.

    Args:
        runner: A runner over this rank's part of the model.
        link: The group.

    Returns:
        The process exit status (0: rank 0 stopped cleanly; 1: the group failed).
    """
    entries: dict[int, Snapshot] = {}
    wait: float | None = STARTUP_SECONDS  # rank 0 may still be starting its HTTP server
    while True:
        try:
            message = Message.decode(link.broadcast(None, wait))
            wait = None
        except RuntimeError as e:  # a peer closed its sockets: rank 0 is gone or failing
            logger.error("rank %d: lost the group (%s); exiting", link.rank, e)
            return 1
        if message.kind == STOP:
            logger.info("rank %d: rank 0 stopped; exiting", link.rank)
            logger.info("%s", link.stats.describe(link.rank))
            return 0
        try:
            _replay(runner, message, entries)
        except Exception as e:  # the ranks no longer agree; rank 0 fails when this one leaves
            logger.exception("rank %d: a step failed (%s); exiting", link.rank, e)
            return 1
        if message.kind == STEP:
            link.stats.steps += 1


def _replay(runner: Runner, message: Message, entries: dict[int, Snapshot]) -> None:
    """Repeat rank 0's prompt-cache operations, then run the step's passes."""
    for op in message.ops:
        if op[0] == "snap":
            snap = runner.snapshot(op[1])
            if snap is not None:
                entries[op[2]] = snap
        elif op[0] == "adopt":
            runner.adopt_prefix(_Adopting(op[1], op[3]), entries[op[2]])  # type: ignore[arg-type]
        elif op[0] == "drop":
            entries.pop(op[1], None)
    if message.kind == STEP:
        outputs, _ = runner.forward(message.work)
        mx.eval(outputs)
