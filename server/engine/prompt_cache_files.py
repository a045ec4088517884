"""The prompt cache's session files: queue an entry's file, index the files, load one back.

``SessionFiles`` is the part of ``PromptCache`` (``prompt_cache.py``) that deals with the
directory: which file a session has (a digest of its scope and key), what goes into a file's
metadata (token ids, scope, session key and the model's fingerprint), the index of files on
disk (built lazily, the first time a lookup or listing needs it; a file for another model or
an unreadable one is skipped with a warning), and loading a disk-only entry back into memory.
Writing, reading and deleting the bytes is ``prompt_cache_disk.py``'s (its ``Writer`` thread).

Knows nothing about lookup, eviction or tenants: the manager decides *when* an entry is
persisted or loaded. The mixin uses the manager's fields (declared below for readers); it
runs on the engine thread, like the manager.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from moeserve.server.engine.prompt_cache_disk import Tensor, Writer, read_metadata
from moeserve.server.engine.prompt_cache_entry import KV, Entry, EntryId, PromptCacheConfig
from moeserve.server.engine.session_keys import digest

# One logger for the whole prompt cache, so a filter on prompt_cache also catches its files.
logger = logging.getLogger("moeserve.server.engine.prompt_cache")

SHUTDOWN_FLUSH_SECONDS = 30.0


class SessionFiles:
    """The file half of ``PromptCache``: its methods read and set the manager's fields."""

    # The manager's fields this half uses (``PromptCache`` documents and defines them).
    config: PromptCacheConfig
    clock: Callable[[], float]
    encode: Callable[[KV], dict[str, Tensor]] | None
    load: Callable[[Path], tuple[list[int], KV, int, dict[str, str]]] | None
    saved: Callable[[Entry, Path], None] | None
    discarded: Callable[[Path], None] | None
    entries: dict[EntryId, Entry]
    _disk: dict[EntryId, Entry] | None
    _writer: Writer | None

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
