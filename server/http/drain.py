"""Graceful shutdown: on SIGTERM or SIGINT, running requests finish while new ones get 503.

The sequence, driven by ``DrainingServer`` (a ``uvicorn.Server``) and one ``Drain`` per app:

1. The first signal starts the drain. The listening socket stays open: a new request gets
   503 ``shutting_down`` in OpenAI's envelope (``/health``: 503 ``{"status": "draining"}``)
   with ``Connection: close``, so load balancers and clients move on at once.
2. Running requests, streaming or not, go on for up to ``shutdown_drain_seconds``.
3. At that deadline (or at a second signal) the drain is *cut*: a stream still running ends
   with an error event (503 ``shutting_down``) and ``data: [DONE]``, a non-streaming request
   gets that 503; their engine requests are aborted.
4. Once no request is in flight, uvicorn's own shutdown runs: the socket closes (from then on
   a connection is refused), then the app's lifespan shuts the engine down, which persists
   the prompt cache.

A third signal falls back to uvicorn's own handling (a SIGINT forces the exit).

Knows uvicorn's ``Server`` hooks and ASGI; knows nothing of routes or the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeserve.server.http.asgi import HTTPMiddleware, send_json
from moeserve.server.http.errors import APIError

logger = logging.getLogger("moeserve")

# Seconds after the cut for farewell events to reach slow clients before the exit goes on.
CUT_GRACE_SECONDS = 5.0
_CUT = object()  # queued into every guarded stream at the cut
_END = object()  # the stream's own end


def shutting_down() -> APIError:
    """503 ``shutting_down``: the answer to a request that arrives or outlives a drain.

    Returns:
        The error.
    """
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


class Drain:
    """The shutdown state of one app: whether it drains, its deadline, requests in flight.

    Lives on ``app.state.drain``. Every method runs on the event loop.

    Args:
        seconds: How long running requests get to finish (``shutdown_drain_seconds``).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.draining = False
        self.cut = False
        self.deadline: float | None = None  # time.monotonic() of the cut
        self.in_flight = 0
        self._streams: set[asyncio.Queue] = set()

    def begin(self) -> None:
        """Start draining; called again while draining, cut now."""
        if self.draining:
            self.cut_now()
            return
        self.draining = True
        self.deadline = time.monotonic() + self.seconds
        logger.info(
            "draining: %d request(s) in flight get up to %.1f s; new requests get 503",
            self.in_flight,
            self.seconds,
        )
        asyncio.get_running_loop().call_later(self.seconds, self.cut_now)

    def cut_now(self) -> None:
        """End the drain: streams still running get their farewell, the rest a 503."""
        if self.cut:
            return
        self.cut, self.deadline = True, min(self.deadline or time.monotonic(), time.monotonic())
        if self.in_flight:
            logger.warning("drain deadline: ending %d request(s) in flight", self.in_flight)
        for queue in self._streams:
            queue.put_nowait(_CUT)

    def finished(self) -> bool:
        """Whether the server may go on with its exit.

        Returns:
            True once draining and no request is in flight, or well past the cut.
        """
        if not self.draining:
            return False
        past_cut = self.cut and time.monotonic() > (self.deadline or 0) + CUT_GRACE_SECONDS
        return self.in_flight == 0 or past_cut

    async def guard(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """Relay an SSE stream's payloads until it ends or the drain is cut.

        At the cut the stream's generator is closed (its ``finally`` aborts the engine
        request) and the client gets an error event, then ``[DONE]``. A separate task reads
        ``chunks``, so a stream waiting for its next token is cut just as promptly.

        Args:
            chunks: The ``data:`` payloads.

        Yields:
            The same payloads, or a farewell at the cut.
        """
        relay: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for chunk in chunks:
                    relay.put_nowait(chunk)
                relay.put_nowait(_END)
            except Exception as e:  # re-raised in the consumer below
                relay.put_nowait(e)

        task = asyncio.create_task(pump())
        self._streams.add(relay)
        if self.cut:
            relay.put_nowait(_CUT)
        try:
            while (item := await relay.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                if item is _CUT:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task  # the stream's cleanup (engine abort) runs first
                    yield json.dumps(shutting_down().body())
                    yield "[DONE]"
                    return
                yield item
        finally:
            self._streams.discard(relay)
            task.cancel()  # the client left: the stream's generator is closed as well


def drain_of(app: FastAPI) -> Drain | None:
    """The app's ``Drain``, if it has one.

    Args:
        app: The FastAPI app.

    Returns:
        The drain, or None.
    """
    return getattr(app.state, "drain", None)


class DrainMiddleware(HTTPMiddleware):
    """Counts requests in flight and answers 503 to new ones while the app drains.

    Args:
        app: The ASGI application.
        drain: The app's drain.
    """

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        super().__init__(app)
        self.drain = drain

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request, counted; or refuse it while draining."""
        if self.drain.draining:
            await self._refuse(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Read the body first (the body limit bounds it): closing a socket with unread input
        # resets the connection, and the client would see that instead of the 503.
        message: Message = {"more_body": True}
        while message.get("more_body") and message.get("type") != "http.disconnect":
            message = await receive()
        if scope["path"] == "/health":
            payload: dict[str, Any] = {"status": "draining"}
        else:
            payload = shutting_down().body(scope["path"])
        await send_json(send, 503, payload, [(b"connection", b"close"), (b"retry-after", b"1")])


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that a signal drains the app before the usual shutdown.

    uvicorn alone stops accepting connections at once and, with sse-starlette, cuts every
    stream. Here the main loop goes on until ``Drain.finished()``; then uvicorn's shutdown
    (close the socket, wait for connections, the lifespan's shutdown) runs as usual.

    Args:
        config: The uvicorn configuration.
        drain: The app's drain.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._signals_seen = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain; second: cut the drain; later ones: uvicorn's handling."""
        self._signals_seen += 1
        if not self.started or self._signals_seen > 2:
            super().handle_exit(sig, frame)
            return
        # uvicorn re-raises captured signals after its shutdown, so the exit status still
        # says which signal ended the process.
        self._captured_signals.append(sig)
        # A signal handler may run in the middle of the loop's own code: schedule, not call.
        asyncio.get_running_loop().call_soon_threadsafe(self.drain.begin)

    async def on_tick(self, counter: int) -> bool:
        """Uvicorn's per-tick check, plus: exit once the drain has finished.

        Args:
            counter: uvicorn's tick counter.

        Returns:
            Whether the main loop should end.
        """
        if await super().on_tick(counter):
            return True
        return self.drain.finished()
