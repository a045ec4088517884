"""The per-session prompt-cache manager: keep each conversation's KV cache for its next turn.

Turn N+1 of a chat repeats turns 1..N, so the KV cache left by turn N (its prompt plus its
reply) covers most of turn N+1's prompt. This manager stores finished sequences' caches by
session, finds the longest reusable token prefix for a new prompt, and keeps memory bounded.

Isolation: every entry lives in a *scope*, the caller's tenant (a digest of its API key; ""
without API keys) plus, when a request sends ``cache_salt``, a digest of that salt. Within a
scope there are two pools. A request with a session key stores its turns in that session's
entry, and only a request with the same key (in the same scope) reuses it. A request without
a key stores into, and reuses from, the scope's anonymous pool: a system prompt that many
keyless requests share is prefilled once. A keyed request may also reuse its scope's
anonymous pool (everyone in the scope can already read it), so a session's first turn still
finds a shared system prompt; it never reads another session's entry. The longest common
prefix among those candidates wins (the session's own entry on a tie); a cached sequence that
runs past the point of divergence is cut there. Reuse never changes an output.

Session keys (and salts) are checked at the HTTP boundary (``session_keys.check_key``); all here
still works for any ``str`` (file names hash it with ``surrogatepass``), so a key that slips
through cannot stop the engine.

Memory: a byte budget with least-recently-used eviction, a time-to-live per entry in memory,
and pinning (an entry a running request is reading is never evicted). With a directory, each
session's entry is written as safetensors (token ids, scope and the model's fingerprint in its
metadata) as soon as its turn finishes, by a background thread (``prompt_cache_disk``), so a
``kill -9`` loses at most the turns in flight. Files are found again lazily after a restart,
listed by ``sessions``, and kept until deleted; a file for another model, or a truncated or
corrupt one, is skipped with a warning; hidden leftovers of interrupted writes are removed at
startup. Anonymous entries stay in memory.

The cache payload is opaque here: the engine hands in and takes out snapshots
(``models.cache.Snapshot``), decides how much of an entry's prefix its cache kinds can
resume, and ``encode`` (the engine's) turns them into plain bytes for the writer. Everything
but the writer thread runs on the engine thread; nothing here is thread-safe on its own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeserve.server.engine.prompt_cache_disk import (
    Tensor,
    Writer,
    read_metadata,
    remove_stale_temps,
)
from moeserve.server.engine.session_keys import belongs_to, digest, tenant_of

logger = logging.getLogger(__name__)

KV = Any  # the engine's snapshot of one row (models.cache.Snapshot); opaque here
EntryId = tuple[str, str, int]  # (scope, session key or "", anonymous number or 0)
SHUTDOWN_FLUSH_SECONDS = 30.0


@dataclass
class Entry:
    """One cached token sequence and its KV."""

    key: str  # the session key; "" in the anonymous pool
    tokens: list[int]
    kv: KV | None  # None for an entry only known from disk (see PromptCache._disk)
    nbytes: int
    last_used: float
    pins: int = 0
    path: Path | None = None  # set once a copy of exactly this entry is on disk (or queued)
    anonymous: bool = False
    scope: str = ""
    number: int = 0  # tells the anonymous entries of one scope apart
    saved_at: float | None = None  # wall-clock time of the disk copy (disk-only entries)

    @property
    def id(self) -> EntryId:
        """Where it is filed: scope, key, anonymous number."""
        return (self.scope, self.key, self.number)


@dataclass
class Hit:
    """A lookup result: reuse ``entry``'s first ``length`` tokens."""

    entry: Entry
    length: int


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists.

    Args:
        a: Tokens.
        b: Tokens.

    Returns:
        The prefix length.
    """
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class PromptCacheConfig:
    """Limits of the prompt cache."""

    max_bytes: int = 2 * 1024**3  # LRU eviction above this
    ttl_seconds: float = 3600.0  # entries unused this long leave memory
    directory: Path | None = None  # persistence; None keeps everything in memory only
    fingerprint: str = ""  # identifies the model whose KV this is (persisted files must match)
    min_reuse: int = 1  # ignore hits shorter than this many tokens


@dataclass
class PromptCache:
    """Stores, finds, evicts and persists session KV caches.

    Args:
        config: Limits and persistence.
        clock: Time source (tests pass a fake one).
        encode: Turns an entry's KV into plain tensors for a file (the engine's
            ``kv_io.tensors``; it runs on the engine thread).
        load: Reads a file back into ``(tokens, kv, nbytes, metadata)``.
        saved: Told of each session file queued for writing, with its entry (a distributed
            rank 0 has the other ranks write their part of it under the same name).
        discarded: Told of each session file deleted (the other ranks delete theirs).
    """

    config: PromptCacheConfig
    clock: Callable[[], float] = time.monotonic
    encode: Callable[[KV], dict[str, Tensor]] | None = None
    load: Callable[[Path], tuple[list[int], KV, int, dict[str, str]]] | None = None
    saved: Callable[[Entry, Path], None] | None = None
    discarded: Callable[[Path], None] | None = None
    entries: dict[EntryId, Entry] = field(default_factory=dict)
    _disk: dict[EntryId, Entry] | None = None  # persisted sessions, indexed lazily
    _writer: Writer | None = field(default=None, init=False, repr=False)
    _anon: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.config.directory is not None:
            remove_stale_temps(self.config.directory)  # torn writes of an earlier process
            self._writer = Writer(max_pending_bytes=max(self.config.max_bytes, 1))

    # ----- queries ------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return sum(e.nbytes for e in self.entries.values())

    def nbytes_of(self, tenant: str | None) -> int:
        """Bytes held in memory for one tenant (its sessions and anonymous pool).

        Args:
            tenant: The tenant; None counts every tenant's.

        Returns:
            The bytes.
        """
        return sum(e.nbytes for e in self.entries.values() if self._owned(e, tenant))

    def lookup(self, scope: str, session: str | None, tokens: list[int]) -> Hit | None:
        """Find the longest reusable prefix of ``tokens`` and pin its entry.

        Candidates: the session's own entry (in memory or on disk) and the scope's
        anonymous pool; never another session's entry or another scope's.

        Args:
            scope: The request's scope (``scope_of``).
            session: The request's session key, or None.
            tokens: The new prompt.

        Returns:
            The hit (call ``release`` when the request is done), or None.
        """
        self.expire()
        best: Hit | None = None
        if session:
            own = self.entries.get((scope, session, 0)) or self._disk_index().get(
                (scope, session, 0)
            )
            if own is not None:
                best = Hit(own, common_prefix(own.tokens, tokens))
        for entry in self.entries.values():
            if entry.anonymous and entry.scope == scope:
                length = common_prefix(entry.tokens, tokens)
                if best is None or length > best.length:
                    best = Hit(entry, length)
        if best is None or best.length < self.config.min_reuse:
            return None
        if best.entry.kv is None:
            loaded = self._materialise(best.entry)
            if loaded is None:
                return None
            best = Hit(loaded, min(best.length, common_prefix(loaded.tokens, tokens)))
        best.entry.pins += 1
        best.entry.last_used = self.clock()
        return best

    def release(self, hit: Hit) -> None:
        """Unpin an entry returned by ``lookup``.

        Args:
            hit: The lookup result.
        """
        hit.entry.pins = max(0, hit.entry.pins - 1)
        self.enforce_budget()

    def sessions(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Describe the cached sessions, in memory and on disk (admin listing).

        Args:
            tenant: Only this tenant's sessions; None lists every tenant's.

        Returns:
            One dict per session: key, scope, tokens, bytes, last use (unix seconds), pinned,
            persisted; most recently used first.
        """
        now_wall, now = time.time(), self.clock()
        rows = []
        for e in self.entries.values():
            if not e.anonymous and self._owned(e, tenant):
                rows.append((round(now_wall - (now - e.last_used), 3), e, e.path is not None))
        for i, e in self._disk_index().items():
            if i not in self.entries and self._owned(e, tenant):
                rows.append((round(e.saved_at or 0.0, 3), e, True))
        rows.sort(key=lambda row: -row[0])
        return [
            {
                "key": e.key,
                "scope": e.scope,
                "tokens": len(e.tokens),
                "bytes": e.nbytes,
                "last_used": last_used,
                "pinned": e.pins > 0,
                "persisted": persisted,
            }
            for last_used, e, persisted in rows
        ]

    def anonymous(self, tenant: str | None = None) -> dict[str, int]:
        """Sum up the anonymous pools (requests without a session key), which hold no key.

        Args:
            tenant: Only this tenant's pools; None sums every tenant's.

        Returns:
            ``{"entries", "tokens", "bytes"}`` of the pools' in-memory entries.
        """
        pool = [e for e in self.entries.values() if e.anonymous and self._owned(e, tenant)]
        tokens, nbytes = sum(len(e.tokens) for e in pool), sum(e.nbytes for e in pool)
        return {"entries": len(pool), "tokens": tokens, "bytes": nbytes}

    # ----- updates ------------------------------------------------------------------------

    def store(
        self, scope: str, session: str | None, tokens: list[int], kv: KV, nbytes: int
    ) -> None:
        """Remember a finished sequence's KV for its session (or in the anonymous pool).

        A session's entry is also queued for writing to disk when persistence is on.

        Args:
            scope: The request's scope (``scope_of``).
            session: The session key, or None.
            tokens: The tokens the KV covers (prompt plus generated, as far as computed).
            kv: Per-layer keys/values covering exactly ``tokens``.
            nbytes: Their size.
        """
        if not tokens:
            return
        entry = Entry(session or "", list(tokens), kv, nbytes, self.clock(), scope=scope)
        if not session:
            self._anon += 1
            entry.anonymous, entry.number = True, self._anon
        # A replaced entry a running request still reads keeps its own pin; the new one
        # starts unpinned (copying the pin would leave it pinned forever).
        self.entries[entry.id] = entry
        self._persist(entry)
        self.enforce_budget()

    def drop(self, session: str, tenant: str | None = None) -> int:
        """Forget one session (memory and disk), in every scope of a tenant.

        The entries of its further prompts (``key#p``, ``session_keys.prompt_entry_key``) go
        with it.

        Args:
            session: The key.
            tenant: Only in this tenant's scopes; None in every tenant's.

        Returns:
            How many entries were dropped (0: none existed).
        """
        return self._forget(lambda e: not e.anonymous and belongs_to(e.key, session), tenant)

    def clear(self, tenant: str | None = None) -> int:
        """Forget every entry of a tenant (sessions and anonymous pool, memory and disk).

        Args:
            tenant: Only this tenant's; None forgets everything.

        Returns:
            How many entries were dropped.
        """
        return self._forget(lambda e: True, tenant)

    def expire(self) -> None:
        """Drop unpinned entries unused for longer than the TTL from memory."""
        horizon = self.clock() - self.config.ttl_seconds
        for i in [i for i, e in self.entries.items() if e.last_used < horizon and not e.pins]:
            del self.entries[i]

    def enforce_budget(self) -> None:
        """Evict least-recently-used unpinned entries until the byte budget holds."""
        total = self.nbytes
        for entry in sorted(self.entries.values(), key=lambda e: e.last_used):
            if total <= self.config.max_bytes:
                break
            if entry.pins:
                continue
            total -= entry.nbytes
            del self.entries[entry.id]
            self._persist(entry)  # normally already written when its turn finished

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queued disk writes are done (tests; shutdown).

        Args:
            timeout: Seconds to wait at most.

        Returns:
            Whether everything queued is on disk.
        """
        return self._writer is None or self._writer.flush(timeout)

    def shutdown(self) -> None:
        """Write every session not yet on disk, and wait for the writer to finish."""
        for entry in list(self.entries.values()):
            self._persist(entry)
        if self._writer is not None:
            self._writer.close(SHUTDOWN_FLUSH_SECONDS)

    # ----- persistence ------------------------------------------------------------------------

    def _owned(self, entry: Entry, tenant: str | None) -> bool:
        return tenant is None or tenant_of(entry.scope) == tenant

    def _forget(self, match: Callable[[Entry], bool], tenant: str | None) -> int:
        gone = {i for i, e in self.entries.items() if match(e) and self._owned(e, tenant)}
        disk = self._disk_index()
        gone |= {i for i, e in disk.items() if match(e) and self._owned(e, tenant)}
        for i in gone:
            self.entries.pop(i, None)
            on_disk = disk.pop(i, None)
            if on_disk is not None and on_disk.path is not None:
                self._discard(on_disk.path)
        return len(gone)

    def _discard(self, path: Path) -> None:
        if self._writer is not None:
            self._writer.discard(path)
            if self.discarded is not None:
                self.discarded(path)

    def _file(self, scope: str, key: str) -> Path:
        return self.config.directory / f"{digest(scope, key)[:32]}.safetensors"

    def _persist(self, entry: Entry) -> None:
        """Queue a session entry's file unless it is already on disk (or persistence is off)."""
        if self._writer is None or self.encode is None or entry.anonymous:
            return
        if entry.kv is None or entry.path is not None:
            return  # the file on disk is current
        path = self._file(entry.scope, entry.key)
        meta = {
            "moeserve_fingerprint": self.config.fingerprint,
            "session": entry.key,
            "scope": entry.scope,
            "tokens": json.dumps(entry.tokens),
        }
        try:
            tensors = self.encode(entry.kv)
        except Exception as e:  # the entry stays usable in memory; only its file is lost
            logger.warning("prompt cache: could not encode session for %s: %s", path, e)
            return
        if not self._writer.submit(path, tensors, meta):
            logger.warning("prompt cache: write queue full; %s is not saved yet", path)
            return
        index = self._disk_index()
        old = index.get(entry.id)
        if old is not None and old.path not in (None, path):
            self._discard(old.path)  # a file of the same session under an older name
        entry.path = path
        if self.saved is not None:
            self.saved(entry, path)
        index[entry.id] = Entry(
            entry.key,
            entry.tokens,
            None,
            entry.nbytes,
            entry.last_used,
            path=path,
            scope=entry.scope,
            saved_at=time.time(),
        )

    def _disk_index(self) -> dict[EntryId, Entry]:
        if self._disk is None:
            self._disk = {}
            if self.config.directory is not None and self.config.directory.is_dir():
                for path in sorted(self.config.directory.glob("*.safetensors")):
                    if path.name.startswith("."):
                        continue  # a write in progress (see prompt_cache_disk.Writer)
                    entry = self._read_header(path)
                    if entry is not None:
                        self._disk[entry.id] = entry
        return self._disk

    def _read_header(self, path: Path) -> Entry | None:
        try:
            meta, size, mtime = read_metadata(path)
            if meta.get("moeserve_fingerprint") != self.config.fingerprint:
                logger.warning("prompt cache: %s belongs to another model; ignored", path)
                return None
            tokens = json.loads(meta["tokens"])
            scope = meta.get("scope", "")  # files from before scopes: the no-auth scope
            return Entry(
                meta["session"], tokens, None, size, 0.0, path=path, scope=scope, saved_at=mtime
            )
        except Exception as e:  # any unreadable file is skipped, never fatal
            logger.warning("prompt cache: %s is unreadable (%s); ignored", path, e)
            return None

    def _materialise(self, on_disk: Entry) -> Entry | None:
        """Load a disk-only session into memory; on failure forget it and report a miss."""
        if self.load is None or on_disk.path is None:
            return None
        if self._writer is not None:
            # Evicted before its background write landed: wait for that file, not a miss.
            self._writer.wait(on_disk.path, SHUTDOWN_FLUSH_SECONDS)
        try:
            tokens, kv, nbytes, _ = self.load(on_disk.path)
        except Exception as e:  # a corrupt file is a miss, not a crash
            logger.warning("prompt cache: could not load %s (%s); ignored", on_disk.path, e)
            self._disk_index().pop(on_disk.id, None)
            return None
        entry = Entry(
            on_disk.key, tokens, kv, nbytes, self.clock(), path=on_disk.path, scope=on_disk.scope
        )
        self.entries[entry.id] = entry
        return entry
