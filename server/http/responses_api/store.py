"""Finished responses kept in memory, for ``previous_response_id`` and ``GET``/``DELETE``.

A response created with ``store: true`` (the default) is kept with the conversation it ended:
every input item of its chain (the stored conversation it continued, then its own input;
``instructions`` never, as they do not carry over) followed by its output as input items, so
that a response continuing it needs only this one entry, whatever became of the older ones.
The items are shared between entries, not copied, so a long chain costs a list of references
per turn. It also keeps the prompt-cache session the response used, so that its continuation
reuses that session's KV cache.

Bounded twice: at most ``max_entries`` responses (the oldest leave first) and each for at
most ``ttl_seconds`` after it was stored. ``max_entries`` 0 stores nothing. Entries belong to
the tenant that created them (a digest of its API key, "" without keys): another tenant's
lookup finds nothing, exactly as an unknown id. In memory only: a restart forgets them.
Called from the event loop only, so nothing here locks. Knows nothing of HTTP or the engine.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from moeserve.server.http.responses_api.objects import ResponseObject
from moeserve.server.http.responses_api.protocol import InputItem


@dataclass(frozen=True)
class StoredResponse:
    """One finished response and what continuing it needs."""

    response: ResponseObject  # as returned (GET answers it)
    items: list[InputItem]  # the whole conversation up to and including its output
    tenant: str  # who may read it
    session_key: str | None  # the prompt-cache session it used
    expires: float  # on the store's clock


class ResponseStore:
    """A bounded, expiring map of response id to ``StoredResponse``.

    Args:
        max_entries: Responses kept at most (0: none).
        ttl_seconds: How long each is kept after it is stored.
        clock: Seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        max_entries: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def put(
        self,
        response: ResponseObject,
        items: list[InputItem],
        tenant: str,
        session_key: str | None,
    ) -> None:
        """Keep a finished response, dropping the oldest beyond ``max_entries``.

        Args:
            response: The response as returned.
            items: Its conversation, output included.
            tenant: The creator's tenant.
            session_key: The prompt-cache session it used.
        """
        if self.max_entries <= 0:
            return
        expires = self.clock() + self.ttl_seconds
        self._entries[response.id] = StoredResponse(response, items, tenant, session_key, expires)
        self._entries.move_to_end(response.id)
        self._expire()
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str, tenant: str) -> StoredResponse | None:
        """A stored response, if it exists, has not expired and is the tenant's.

        Args:
            response_id: The id.
            tenant: The caller's tenant.

        Returns:
            The entry, or None.
        """
        self._expire()
        entry = self._entries.get(response_id)
        return entry if entry is not None and entry.tenant == tenant else None

    def delete(self, response_id: str, tenant: str) -> bool:
        """Forget a response.

        Args:
            response_id: The id.
            tenant: The caller's tenant (another tenant's response is not touched).

        Returns:
            Whether there was one to forget.
        """
        if self.get(response_id, tenant) is None:
            return False
        del self._entries[response_id]
        return True

    def _expire(self) -> None:
        # Every entry lives equally long, so expiry follows storing order: the oldest first.
        now = self.clock()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires > now:
                break
            self._entries.popitem(last=False)
