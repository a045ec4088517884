"""Each rank's own part of the prompt cache: its entries in memory, its files on disk.

Rank 0's ``PromptCache`` is the one index (sessions, lookups, eviction, TTL, which files
exist); every other rank holds only its layers' or heads' part of each entry, under the key
rank 0 gave the entry (``wire``), and acts only when rank 0's message says so. ``RankEntries``
is that part on a rank other than 0: it applies the prompt-cache operations of a message and
answers rank 0's questions.

Files are keyed by rank: rank r of n in mode m keeps its part of a session in
``<prompt_cache_dir>/<m>-rank<r>-of-<n>/``, under the file name rank 0 uses for the whole
session in its own such directory, and with a fingerprint that includes the mode, the rank
and the world size (``rank_files``), so that no server ever loads a part of another layout,
and rank 0 never lists another rank's files as sessions. A part's file carries the entry's
tokens, so that a ``load`` can check it covers what rank 0's file covers (``tokens_digest``).

Writes go through the same background ``Writer`` and ``kv_io.tensors`` as a single server's.
Knows snapshots, files and the wire's operations; not sessions, scopes or HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeserve.models.cache import Snapshot
from moeserve.server.engine import kv_io
from moeserve.server.engine.prompt_cache import SHUTDOWN_FLUSH_SECONDS
from moeserve.server.engine.prompt_cache_disk import Writer, remove_stale_temps
from moeserve.server.engine.runner import Runner

logger = logging.getLogger("moeserve.distributed")


def rank_files(
    directory: Path, fingerprint: str, mode: str, rank: int, size: int
) -> tuple[Path, str]:
    """Where one rank keeps its part of the persisted prompt cache, and its fingerprint.

    Args:
        directory: ``prompt_cache_dir``.
        fingerprint: The model's (``startup.weights_fingerprint``).
        mode: ``pipeline`` or ``tensor``.
        rank: This rank.
        size: The world size.

    Returns:
        ``(<directory>/<mode>-rank<rank>-of-<size>, a fingerprint of this layout)``.
    """
    layout = f"{mode}-rank{rank}-of-{size}"
    digest = hashlib.sha256(f"{fingerprint}/{layout}".encode()).hexdigest()[:32]
    return directory / layout, digest


def tokens_digest(tokens: list[int]) -> str:
    """A short digest of an entry's tokens (a ``load`` question names the entry by it).

    Args:
        tokens: The tokens.

    Returns:
        32 hex digits.
    """
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:32]


@dataclass
class _Adopting:
    """What ``Runner.adopt_prefix`` reads of a sequence."""

    seq_id: str
    num_computed: int


@dataclass
class RankEntries:
    """A rank's part of every prompt-cache entry (a rank other than 0).

    Args:
        runner: This rank's runner (snapshots, adoption, usable lengths).
        directory: This rank's file directory (``rank_files``); None: nothing persisted.
        fingerprint: This rank's fingerprint (``rank_files``).
        max_pending_bytes: The writer's bound on bytes waiting (``prompt_cache_max_bytes``).
        wait_seconds: How long a ``load`` waits for a write of its file still queued here;
            less than the collective timeout, so that a slow disk is a miss, not an exit.
    """

    runner: Runner
    directory: Path | None = None
    fingerprint: str = ""
    max_pending_bytes: int = 2 * 1024**3
    wait_seconds: float = SHUTDOWN_FLUSH_SECONDS
    entries: dict[int, Snapshot] = field(default_factory=dict)
    _writer: Writer | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.directory is not None:
            remove_stale_temps(self.directory)  # torn writes of an earlier process
            self._writer = Writer(max_pending_bytes=max(self.max_pending_bytes, 1))

    def apply(self, op: list[Any]) -> None:
        """Repeat one of rank 0's prompt-cache operations (``wire``) on this rank's part.

        Args:
            op: The operation.
        """
        kind = op[0]
        if kind == "snap":
            snap = self.runner.snapshot(op[1])
            if snap is not None:
                self.entries[op[2]] = snap
        elif kind == "adopt":
            self.runner.adopt_prefix(_Adopting(op[1], op[3]), self.entries[op[2]])  # type: ignore[arg-type]
        elif kind == "drop":
            self.entries.pop(op[1], None)
        elif kind in ("save", "delete"):
            try:
                self._file_op(op)
            except Exception:  # a lost file costs a later miss, never the group
                logger.exception(
                    "prompt cache: could not %s %s", kind, op[2 if kind == "save" else 1]
                )

    def answer(self, question: list[Any]) -> int:
        """This rank's answer to a question of rank 0 (``wire``); never raises.

        Args:
            question: ``("load", ...)`` or ``("usable", ...)``.

        Returns:
            The answer (0 when this rank cannot say yes).
        """
        try:
            if question[0] == "load":
                return int(self._load(question[1], question[2], question[3]))
            if question[0] == "usable":
                snap = self.entries.get(question[1])
                return 0 if snap is None else self.runner.store.usable_length(snap, question[2])
            logger.error("prompt cache: unknown question %r", question[0])
        except Exception:  # whatever failed, the answer must still reach the others
            logger.exception("prompt cache: could not answer %r", question[:3])
        return 0

    def settle(self, question: list[Any], answers: list[int]) -> None:
        """After every rank answered: keep a loaded part only if every rank loaded its own.

        Args:
            question: The question.
            answers: Every rank's answer, by rank.
        """
        if question[0] == "load" and min(answers) == 0:
            self.entries.pop(question[1], None)

    def close(self) -> None:
        """Write the files still queued (the process is about to leave)."""
        if self._writer is not None:
            self._writer.close(SHUTDOWN_FLUSH_SECONDS)

    def _path(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / Path(name).name  # a bare file name, never a path elsewhere

    def _file_op(self, op: list[Any]) -> None:
        if op[0] == "save":
            self._save(op[1], op[2], op[3])
        elif self._writer is not None:
            self._writer.discard(self._path(op[1]))

    def _save(self, key: int, name: str, tokens: list[int]) -> None:
        snap = self.entries.get(key)
        if self._writer is None or snap is None:
            return  # never persisted here, or never held: a later load is a miss
        if snap.length != len(tokens):
            logger.warning(
                "prompt cache: part %d covers %d tokens, not %d", key, snap.length, len(tokens)
            )
            return
        meta = {"moeserve_fingerprint": self.fingerprint, "tokens": json.dumps(tokens)}
        path = self._path(name)
        if not self._writer.submit(path, kv_io.tensors(snap), meta):
            logger.warning("prompt cache: write queue full; %s is not saved", path)

    def _load(self, key: int, name: str, digest: str) -> bool:
        if self._writer is None:
            return False
        path = self._path(name)
        # Evicted before its background write landed: wait for that file, not a miss.
        self._writer.wait(path, self.wait_seconds)
        if not path.is_file():
            logger.warning("prompt cache: %s is missing; the hit is a miss", path)
            return False
        tokens, snap, _, meta = kv_io.load(path)
        if meta.get("moeserve_fingerprint") != self.fingerprint or tokens_digest(tokens) != digest:
            logger.warning("prompt cache: %s is of another model or session; a miss", path)
            return False
        self.entries[key] = snap
        return True
