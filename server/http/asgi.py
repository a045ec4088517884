"""What the pure ASGI middleware share: HTTP-only dispatch, and a small JSON answer.

The middleware (the API-key check and the metrics in ``app.py``, the drain in ``drain.py``,
the body limit in ``limits.py``) are pure ASGI so that streams are never buffered. Each acts
on HTTP requests only (``HTTPMiddleware``), and those that refuse a request before any route
runs cannot use FastAPI's responses: ``send_json`` writes the two ASGI messages. Knows ASGI
messages; knows nothing of routes, error envelopes or the engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send


class HTTPMiddleware:
    """Base of a pure ASGI middleware: HTTP requests go to ``handle``, the rest pass through.

    Lifespan events (and websockets, which the API has none of) reach the app untouched.

    Args:
        app: The wrapped application.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch: ``handle`` for HTTP, the wrapped app for anything else."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request; ``self.app`` runs it.

        Args:
            scope: The request's ASGI scope.
            receive: Its receive callable.
            send: Its send callable.
        """
        raise NotImplementedError


async def send_json(
    send: Send, status: int, payload: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send a complete response: ``payload`` as JSON, with its type and length.

    Args:
        send: The ASGI send callable of the request being answered.
        status: The HTTP status.
        payload: The JSON body (an OpenAI error envelope, or ``/health``'s status).
        headers: More headers, after ``content-type`` and ``content-length``.
    """
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
