"""What the prompt cache holds: one cached entry, a lookup hit, the cache's limits.

Knows the shape of an entry (its session key, scope, tokens, opaque KV, size, pins and disk
copy), how entries are filed (``EntryId``), how long a prefix two token lists share, and the
limits a ``PromptCache`` is built with. Knows nothing about lookup, eviction or files: those
are ``prompt_cache.py``'s and ``prompt_cache_files.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

KV = Any  # the engine's snapshot of one row (models.cache.Snapshot); opaque here
EntryId = tuple[str, str, int]  # (scope, session key or "", anonymous number or 0)


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
