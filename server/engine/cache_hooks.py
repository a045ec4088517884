"""The engine's side of the prompt cache: look up, resume, unpin, remember, persist.

``Engine`` inherits these hooks; they run on the engine thread, which alone touches the
prompt cache. Each one is guarded: a prompt-cache failure costs at most the reuse of a prefix
or one stored entry, never a request or the engine thread. ``DistributedEngine`` overrides
``_lookup`` and ``_reusable`` so that every rank agrees on what is reused.

It knows the prompt cache, the runner's snapshots and what its cache store can resume. It does
not know the inbox, the scheduler or events: ``Engine`` decides when each hook runs.
"""

from __future__ import annotations

import logging

from moeserve.server.engine.events import GenerationRequest
from moeserve.server.engine.prompt_cache import Hit, PromptCache
from moeserve.server.engine.runner import Runner
from moeserve.server.engine.sequence import Sequence

# The engine's logger: these failures were always reported under its name, and still are.
logger = logging.getLogger("moeserve.server.engine.engine")


class PromptCacheHooks:
    """The prompt-cache calls the engine makes, each of which may fail without harm.

    A subclass sets ``prompt_cache`` (None: no prompt cache, every hook does nothing) and
    ``runner``.
    """

    prompt_cache: PromptCache | None
    runner: Runner

    def _persist_at_shutdown(self, cache: PromptCache) -> None:
        """Write the sessions not yet on disk and wait for the writer (a directory is set)."""
        try:
            cache.shutdown()
        except Exception:  # the engine stopped cleanly; only unsaved sessions are lost
            logger.exception("prompt cache: could not persist sessions at shutdown")

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

    def _reusable(self, hit: Hit, shared: int) -> int:
        """How many of a hit's ``shared`` positions the cache can resume.

        A distributed rank 0 asks every rank: their layers may hold other kinds.
        """
        return self.runner.store.usable_length(hit.entry.kv, shared)

    def _release(self, hit: Hit | None) -> None:
        """Unpin a prompt-cache hit; a failure there (eviction, a write) costs no request."""
        if hit is None or self.prompt_cache is None:
            return
        try:
            self.prompt_cache.release(hit)
        except Exception:
            logger.exception("prompt-cache release failed")

    def _remember(self, seq: Sequence, request: GenerationRequest) -> None:
        """Store a finished sequence's KV for its session's next turn (choice 0 only)."""
        if self.prompt_cache is None or seq.index != 0:
            return
        try:
            snap = self.runner.snapshot(seq.seq_id)
            if snap is None:
                return
            tokens = seq.all_ids[: snap.length]
            self.prompt_cache.store(
                request.cache_scope, request.session_key, tokens, snap, snap.nbytes
            )
        except Exception:  # the output is complete; only the next turn's reuse is lost
            logger.exception("prompt-cache store failed for %s", request.request_id)
