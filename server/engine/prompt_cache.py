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

Where the parts live: this module is the manager (lookup, storing, listing, forgetting,
expiry and the byte budget); ``Entry``, ``Hit``, ``common_prefix`` and the limits
(``PromptCacheConfig``) are ``prompt_cache_entry.py``'s; naming, indexing and loading the
session files is ``prompt_cache_files.py``'s ``SessionFiles``, which ``PromptCache``
extends. All of them are importable from here.

The cache payload is opaque here: the engine hands in and takes out snapshots
(``models.cache.Snapshot``), decides how much of an entry's prefix its cache kinds can
resume, and ``encode`` (the engine's) turns them into plain bytes for the writer. Everything
but the writer thread runs on the engine thread; nothing here is thread-safe on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeserve.server.engine.prompt_cache_disk import Tensor, Writer, remove_stale_temps
from moeserve.server.engine.prompt_cache_entry import (
    KV,
    Entry,
    EntryId,
    Hit,
    PromptCacheConfig,
    common_prefix,
)
from moeserve.server.engine.prompt_cache_files import SHUTDOWN_FLUSH_SECONDS, SessionFiles
from moeserve.server.engine.session_keys import belongs_to, tenant_of

# Importers name these here (``from ...prompt_cache import Entry``); they live beside it.
__all__ = [
    "KV",
    "SHUTDOWN_FLUSH_SECONDS",
    "Entry",
    "EntryId",
    "Hit",
    "PromptCache",
    "PromptCacheConfig",
    "common_prefix",
]


@dataclass
class PromptCache(SessionFiles):
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

    # ----- tenants and forgetting -------------------------------------------------------------

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
