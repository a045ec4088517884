"""The OpenAI error envelope and the exception handlers that always produce it.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with a
string ``code``, so the ``openai`` package maps it to the right exception class
(400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...).
The request's path decides the shape: on the Anthropic Messages API's paths the same error is
written in Anthropic's envelope (``anthropic/errors.py``), by the handlers here and by the
middleware that pass their path to ``APIError.body``.
Knows HTTP status codes and pydantic's error shapes; knows nothing of the engine.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeserve.server.http.anthropic.errors import AnthropicError, speaks_anthropic

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """The inside of OpenAI's error envelope."""

    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(BaseModel):
    """``{"error": {...}}``: the body of every 4xx and 5xx answer."""

    error: ErrorDetail


_WHY = {
    400: "Invalid request: the message names the problem and `param` the field",
    401: "Missing or invalid API key (when the server has keys)",
    404: "Unknown model, route or resource",
    413: "Request body over the server's `max_request_bytes`",
    429: "The queue is full; retry after `Retry-After` seconds",
    500: "The generation failed (never caused by a request's content)",
    503: "The model is loading, the engine is down, or the server is shutting down",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses a route can answer.

    Args:
        *statuses: HTTP statuses.

    Returns:
        A mapping for ``APIRouter(responses=...)`` or a route decorator.
    """
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}


class APIError(Exception):
    """An error to send to the client in OpenAI's shape.

    Args:
        status: HTTP status.
        message: Human-readable explanation.
        type: OpenAI error type (``invalid_request_error``, ``server_error``, ...).
        code: A short string code.
        param: The request field at fault, if any.
        headers: Extra response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str = "invalid_value",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers

    def envelope(self) -> ErrorResponse:
        """The error in OpenAI's envelope: the one builder of every error body and SSE event.

        Returns:
            ``{"error": {"message", "type", "param", "code"}}``, ``param`` null when unset.
        """
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail)

    def _shaped(self, path: str) -> BaseModel:
        """OpenAI's envelope, or Anthropic's on the Messages API's paths."""
        if speaks_anthropic(path):
            return AnthropicError.of(self.status, self.message)
        return self.envelope()

    def body(self, path: str = "") -> dict[str, Any]:
        """The JSON body, as a dictionary.

        Args:
            path: The request's path, which decides the envelope ("": OpenAI's).

        Returns:
            ``{"error": {...}}`` (Anthropic's ``{"type": "error", "error": {...}}``).
        """
        return self._shaped(path).model_dump()

    def json(self, path: str = "") -> str:
        """The JSON body, as compact text (the ``data:`` of an error event in a stream).

        Args:
            path: The request's path, which decides the envelope ("": OpenAI's).

        Returns:
            ``{"error": {...}}`` (Anthropic's ``{"type": "error", "error": {...}}``).
        """
        return self._shaped(path).model_dump_json()

    def response(self, path: str = "") -> JSONResponse:
        """As a JSON response.

        Args:
            path: The request's path, which decides the envelope ("": OpenAI's).

        Returns:
            The response.
        """
        return JSONResponse(self.body(path), status_code=self.status, headers=self.headers)


def generation_failed(message: str) -> APIError:
    """500 for a generation that failed after it started (an ``ErrorEvent``).

    Args:
        message: Why (the engine's message is safe to show).

    Returns:
        The error.
    """
    return APIError(500, message, type="server_error", code="generation_failed")


def engine_down(message: str) -> APIError:
    """503 for a dead engine.

    Args:
        message: Why.

    Returns:
        The error.
    """
    return APIError(503, message, type="server_error", code="engine_unavailable")


def model_not_found(name: str) -> APIError:
    """404 for a ``model`` the server does not serve.

    Args:
        name: The requested model.

    Returns:
        The error.
    """
    return APIError(
        404, f"The model '{name}' does not exist", code="model_not_found", param="model"
    )


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("list["):
            continue  # pydantic's union/validator bookkeeping, not a field
        else:
            out += ("." if out else "") + str(part)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming the first offending field.

    Args:
        exc: FastAPI's validation error.

    Returns:
        The error.
    """
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        # The location is a character offset, not a field: name no param, as OpenAI does.
        return APIError(400, "the request body is not valid JSON", param=None)
    if first.get("type") == "lone_surrogate":
        # Found by a whole-body check, so pydantic's location is the body: the path is ours.
        param = first.get("ctx", {}).get("path")
        return APIError(400, message, param=None if param == "body" else param)
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def install_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the OpenAI envelope (and say so).

    Args:
        app: The application.
    """
    _document_400_not_422(app)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.scope["path"])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response(request.scope["path"])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # Starlette's headers carry e.g. the 405's Allow list, which RFC 9110 requires.
        headers = dict(exc.headers) if exc.headers else None
        error = APIError(exc.status_code, str(exc.detail), code=code, headers=headers)
        return error.response(request.scope["path"])

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The log has the traceback; the client gets no Python names or internal details.
        logger.exception("unhandled error")
        return APIError(
            500, "internal server error", type="server_error", code="internal_error"
        ).response(request.scope["path"])


def _document_400_not_422(app: FastAPI) -> None:
    """Drop FastAPI's automatic 422 from ``/openapi.json``: validation failures answer 400."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
