"""The ranks' connection: MLX's distributed group, the step broadcast and the watchdog.

``Link`` wraps the ``mlx.core.distributed`` group that ``mlx.launch`` set up (ring over TCP,
or JACCL over Thunderbolt where present). Rank 0 broadcasts each step's message
(``broadcast``): a length, then the bytes, each as an int32 ``all_sum`` to which the other
ranks add zeros, so the collective every backend has carries it; ``gather_ints`` brings
every rank's answer back (the startup handshake, rank 0's prompt-cache questions). A
broadcast marked idle sends the other ranks to the ``doorbell`` until rank 0 rings it. Every
collective runs under the ``Watchdog``: one that has not returned after ``timeout`` seconds
(a rank died without closing its sockets, a cable was pulled) ends the process with a
message naming this rank, since a collective cannot be interrupted. A peer that closed its
sockets fails the collective at once (MLX raises); the caller turns that into the same exit.

It also counts what crossed (``LinkStats``) for the benchmark. It knows bytes and arrays,
not plans, models or HTTP.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from moeserve.server.distributed.doorbell import Doorbell

logger = logging.getLogger("moeserve.distributed")

# int32 words of the step broadcast's one collective (1 KiB: a decode step of dozens of rows).
BROADCAST_WORDS = 256
# How long a rank waits for the others to load, and for rank 0's first message after that.
STARTUP_SECONDS = 3600.0
# How long a process that failed waits for clients to receive their error events.
EXIT_GRACE_SECONDS = 2.0


@dataclass
class LinkStats:
    """What the step broadcast and the pipeline hand-offs moved, for ``bench/distributed.py``."""

    messages: int = 0  # step broadcasts
    message_bytes: int = 0  # bytes the broadcasts' collectives carried (padding included)
    activation_bytes: int = 0  # hidden states sent or received (pipeline)
    seconds: float = 0.0  # wall time spent inside collectives on this rank
    steps: int = 0  # steps run (rank 0: broadcast; others: replayed)

    def describe(self, rank: int) -> str:
        """One log line with the totals and the per-step means.

        Args:
            rank: This rank.

        Returns:
            The line.
        """
        per = max(self.steps, 1)
        return (
            f"rank {rank} communication: {self.steps} steps, {self.messages} broadcasts "
            f"({self.message_bytes} bytes), {self.activation_bytes} activation bytes, "
            f"{self.seconds:.3f} s in collectives; per step {self.message_bytes / per:.0f} + "
            f"{self.activation_bytes / per:.0f} bytes, {1000 * self.seconds / per:.2f} ms"
        )


class Watchdog:
    """Exits the process when a collective outlives ``timeout`` seconds.

    Args:
        rank: This rank (named in the message).
        timeout: Seconds a collective may take.
        on_timeout: Called (from the watchdog thread) before the exit, with the message; rank 0
            fails its streams there.
    """

    def __init__(self, rank: int, timeout: float, on_timeout: Callable[[str], None]) -> None:
        self.rank = rank
        self.timeout = timeout
        self.on_timeout = on_timeout
        self._since: float | None = None
        self._what = ""
        self._limit = timeout
        self._thread = threading.Thread(target=self._watch, name="moeserve-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def guard(self, what: str, timeout: float | None = None) -> Iterator[None]:
        """Time the collective run inside the block.

        Args:
            what: Named in the message if it times out.
            timeout: Seconds for this one (default: the watchdog's).
        """
        self._what, self._limit = what, timeout or self.timeout
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.5, self.timeout / 4))
            since, limit = self._since, self._limit
            if since is not None and time.monotonic() - since > limit:
                message = (
                    f"rank {self.rank}: {self._what} did not complete within {limit:g} s "
                    "(a rank died or the network is down); exiting"
                )
                logger.error("%s", message)
                try:
                    self.on_timeout(message)
                finally:
                    time.sleep(EXIT_GRACE_SECONDS)
                    os._exit(1)


class Link:
    """This rank's view of the distributed group.

    Args:
        group: The initialised MLX group.
        timeout: Seconds any collective may take before the process exits.
        on_timeout: Called before such an exit (rank 0 fails its streams).
    """

    def __init__(
        self,
        group: mx.distributed.Group,
        timeout: float,
        on_timeout: Callable[[str], None] | None = None,
    ) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.stats = LinkStats()
        self.watchdog = Watchdog(self.rank, timeout, on_timeout or (lambda _m: None))
        self.doorbell: Doorbell | None = None  # set by the startup handshake where possible
        # The last broadcast was idle (or none was sent yet): the other ranks wait on the
        # doorbell, where there is one, before the next.
        self.asleep = True

    @contextmanager
    def collective(self, what: str, timeout: float | None = None) -> Iterator[None]:
        """Guard and time one collective (or a pipeline hand-off).

        Args:
            what: Named if it times out.
            timeout: Seconds for this one (default: the link's).
        """
        start = time.perf_counter()
        with self.watchdog.guard(what, timeout):
            yield
        self.stats.seconds += time.perf_counter() - start

    def broadcast(
        self, payload: bytes | None, timeout: float | None = None, idle: bool = False
    ) -> bytes:
        """Send rank 0's bytes to every rank; every rank calls this in the same order.

        One ``all_sum`` of ``BROADCAST_WORDS`` int32 words carries the length, the idle flag
        and, usually, the whole message; a longer one (a long prefill chunk's tokens) takes a
        second collective for the rest. One collective per step matters: each is a round
        trip. After an idle message the other ranks sleep on the doorbell (where there is
        one) and rank 0 rings it before the next message, rather than their spinning in the
        collective for as long as rank 0 has no work.

        Args:
            payload: Rank 0's message; ignored elsewhere.
            timeout: Seconds it may take (default: the link's).
            idle: Rank 0: no work follows soon (a ping while it waits); ignored elsewhere.

        Returns:
            The message.
        """
        room = (BROADCAST_WORDS - 2) * 4
        with self.collective("the step broadcast", timeout):
            if self.asleep and self.doorbell is not None:
                (self.doorbell.ring if self.rank == 0 else self.doorbell.wait)()
            mine = payload if self.rank == 0 and payload is not None else b""
            words = np.zeros(BROADCAST_WORDS, np.int32)
            if self.rank == 0:
                words[0], words[1] = len(mine), int(idle)
                head = mine[:room]
                words[2:].view(np.uint8)[: len(head)] = np.frombuffer(head, np.uint8)
            first = mx.distributed.all_sum(mx.array(words), group=self.group)
            mx.eval(first)
            received = np.array(first)
            length, self.asleep = int(received[0]), bool(received[1])
            out = received[2:].view(np.uint8)[: min(length, room)].tobytes()
            sent = words.nbytes
            if length > room:
                rest = np.zeros((length - room + 3) // 4, np.int32)
                if self.rank == 0:
                    rest.view(np.uint8)[: length - room] = np.frombuffer(mine[room:], np.uint8)
                second = mx.distributed.all_sum(mx.array(rest), group=self.group)
                mx.eval(second)
                out += np.array(second).view(np.uint8)[: length - room].tobytes()
                sent += rest.nbytes
        self.stats.messages += 1
        self.stats.message_bytes += sent
        return out

    def gather_ints(
        self,
        values: list[int],
        what: str = "the startup handshake",
        timeout: float | None = STARTUP_SECONDS,
    ) -> list[list[int]]:
        """Every rank's list of ints (of one length), by rank.

        The startup handshake and the answers to rank 0's prompt-cache questions.

        Args:
            values: This rank's values (int64).
            what: Named if it times out.
            timeout: Seconds it may take. The default fits the handshake: the ranks finish
                loading at different times, so it is bounded by ``STARTUP_SECONDS``, not by
                the step timeout (None: the link's).

        Returns:
            ``size`` lists.
        """
        with self.collective(what, timeout):
            row = mx.array(values, dtype=mx.int64)[None]
            out = mx.distributed.all_gather(row, group=self.group)
            mx.eval(out)
        return out.tolist()


def init_group(backend: str = "any") -> mx.distributed.Group:
    """The group ``mlx.launch`` prepared for this process.

    Args:
        backend: ``any`` (MLX picks: JACCL, ring, MPI) or one of them by name.

    Returns:
        The group.

    Raises:
        RuntimeError: Not started by ``mlx.launch`` (no group, or a group of one).
    """
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(
            f"--distributed needs the ranks started by mlx.launch ({e}); e.g. "
            "`mlx.launch -n 2 --backend ring -- moeserve serve --distributed pipeline ...`"
        ) from e
    if group.size() < 2:
        raise RuntimeError(
            "--distributed needs at least 2 ranks; start them with `mlx.launch -n 2 ...`"
        )
    return group
