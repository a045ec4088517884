"""The request-body limit: a body over ``max_request_bytes`` gets 413 before it is read.

``BodyLimitMiddleware`` is a pure ASGI middleware. A ``Content-Length`` over the limit is
answered at once, without reading a byte of the body; a chunked body is counted as the
application reads it, and answered the moment the count crosses the limit (the application
then sees a disconnect, and whatever it answers to that is dropped). Either way no more than
the limit is ever buffered.

The 413 does not ask to close the connection. Closing a socket that still holds unread input
makes the kernel reset the connection, and a client still sending its body would then see
"connection reset" instead of the answer. Left open, the server (uvicorn's h11 protocol)
reads and discards the rest of the body in small pieces, as nginx's lingering close does,
and the connection can serve the next request.

Knows ASGI messages and OpenAI's error envelope; knows nothing of routes or the engine.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeserve.server.http.asgi import HTTPMiddleware, send_json
from moeserve.server.http.errors import APIError

logger = logging.getLogger(__name__)


def too_large(limit: int) -> APIError:
    """413 ``request_too_large`` in OpenAI's envelope.

    Args:
        limit: The limit in bytes.

    Returns:
        The error.
    """
    return APIError(
        413,
        f"The request body exceeds the server's limit of {limit} bytes (max_request_bytes)",
        code="request_too_large",
    )


def _declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, or None (absent: chunked or no body)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed length before the app runs
    return None


class BodyLimitMiddleware(HTTPMiddleware):
    """Refuses request bodies over ``max_bytes`` with 413, while they are being read.

    Args:
        app: The ASGI application.
        max_bytes: The largest body accepted.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send, path: str) -> None:
        await send_json(send, 413, too_large(self.max_bytes).body(path))

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request through, counting its body; answer 413 once it is too large."""
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, scope["path"])
            return
        state = {"received": 0, "refused": False, "started": False}

        async def counted_receive() -> Message:
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request":
                return message
            state["received"] += len(message.get("body", b""))
            if state["received"] <= self.max_bytes:
                return message
            # What the application reads as a disconnect it stops reading at once. Once its
            # own answer has begun (never, for these routes: they read the whole body
            # first) that answer stands; otherwise the 413 goes out now.
            if not state["started"]:
                state["refused"] = True
                await self._refuse(send, scope["path"])
            return {"type": "http.disconnect"}

        async def guarded_send(message: Message) -> None:
            if state["refused"]:
                return  # the 413 is the answer; the app's reply to the "disconnect" is not
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise
            # An app that raises on the disconnect it was shown: the 413 already went out.
            logger.debug("error after refusing an oversized body", exc_info=True)
