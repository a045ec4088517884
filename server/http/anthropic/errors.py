"""Anthropic's error envelope, and which request paths answer in it.

Anthropic's API reports every failure as ``{"type": "error", "error": {"type", "message"}}``
with an error type per HTTP status (400 ``invalid_request_error``, 401
``authentication_error``, 404 ``not_found_error``, 429 ``rate_limit_error``, ...); the
``anthropic`` package raises its exception class from the status and reads the message from
this body. Requests on the Messages API's paths are answered in this shape wherever they fail
(``server/http/errors.py`` asks ``speaks_anthropic``), in the API-key and body-limit
middleware as much as in a route. Knows HTTP statuses; knows nothing of OpenAI's envelope or
the engine, and imports nothing of the server, so ``errors.py`` can import it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

MESSAGES_PATH = "/v1/messages"

# Anthropic's documented types; any other 4xx is an invalid request, any other 5xx an API
# error. Our 503 (loading, draining, engine down) is Anthropic's "try again soon", its 529.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def speaks_anthropic(path: str) -> bool:
    """Whether a request path belongs to the Messages API (and so gets Anthropic's errors).

    Args:
        path: The request's path (``scope["path"]``).

    Returns:
        True for ``/v1/messages`` and everything under it.
    """
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status.

    Args:
        status: The HTTP status.

    Returns:
        The type, e.g. ``invalid_request_error``.
    """
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


class AnthropicErrorDetail(BaseModel):
    """The inside of Anthropic's error envelope."""

    type: str
    message: str


class AnthropicError(BaseModel):
    """``{"type": "error", "error": {...}}``: every failure's body, and a stream's error event."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail

    @classmethod
    def of(cls, status: int, message: str) -> AnthropicError:
        """The envelope of a failure.

        Args:
            status: Its HTTP status (which decides the type).
            message: Why, as the client reads it.

        Returns:
            The body.
        """
        return cls(error=AnthropicErrorDetail(type=error_type(status), message=message))
