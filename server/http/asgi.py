"""What the pure ASGI middleware share: answering a request with a small JSON body.

The middleware that refuse a request before any route runs (the API-key check in ``app.py``,
the drain in ``drain.py``, the body limit in ``limits.py``) cannot use FastAPI's responses:
they write the two ASGI messages themselves, and this is where. Knows ASGI messages; knows
nothing of routes, error envelopes or the engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.types import Send


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
