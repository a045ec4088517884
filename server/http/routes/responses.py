"""``/v1/responses``: OpenAI's Responses API over the chat pipeline.

``POST`` translates the request, with the stored conversation ``previous_response_id`` names,
into a chat request (``responses_api/translate.py``) and hands it to ``chat.start``: templates,
tool formats, constraints, sampling and the prompt cache are chat's. The generated text
becomes output items (``responses_api/output.py``), streamed as ``response.*`` events
(``responses_api/stream.py``) or returned whole. ``GET`` and ``DELETE`` read and forget
stored responses (``responses_api/store.py``, kept on the app's state).

Prompt-cache continuity: a response uses the session key its request names
(``prompt_cache_key``, ``X-Session-ID``, ``user``, as chat does); without one it continues the
session of the response it follows, and a stored response that starts a chain opens a session
named by its own id. So each turn of a chain of ``previous_response_id`` prefills only what
is new. Not served here: background responses, ``/cancel``, ``/input_items``, conversations.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from moeserve.server.http.deps import Runtime, RuntimeDep
from moeserve.server.http.errors import APIError, error_responses
from moeserve.server.http.responses_api import stream, translate
from moeserve.server.http.responses_api.objects import ResponseDeleted, ResponseObject
from moeserve.server.http.responses_api.output import OutputBuilder
from moeserve.server.http.responses_api.protocol import ResponsesRequest
from moeserve.server.http.responses_api.store import ResponseStore
from moeserve.server.http.routes import chat, common, generation

router = APIRouter(tags=["responses"], responses=error_responses(400, 401, 404, 413, 429, 500, 503))

# OpenAPI: with ``stream: true`` the 200 answer is a stream of named server-sent events.
STREAM_EVENTS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The response, or with `stream: true` its `response.*` events as "
        "server-sent events (`event: <type>`, `data: <JSON with the same type>`)",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                    "required": ["event", "data"],
                }
            }
        },
    }
}


def response_store(http: Request, runtime: Runtime) -> ResponseStore:
    """The app's store of finished responses, made on first use from the settings.

    Args:
        http: The HTTP request (its app's state holds the store).
        runtime: The runtime (``responses_store_max``, ``responses_store_ttl_seconds``).

    Returns:
        The store.
    """
    store = getattr(http.app.state, "responses_store", None)
    if store is None:
        settings = runtime.settings
        store = ResponseStore(settings.responses_store_max, settings.responses_store_ttl_seconds)
        http.app.state.responses_store = store
    return store


def not_found(response_id: str, param: str | None = None) -> APIError:
    """404 for a response id that is unknown, expired, or another tenant's.

    Args:
        response_id: The id asked for.
        param: The request field that named it, if any.

    Returns:
        The error.
    """
    return APIError(
        404, f"Response with id '{response_id}' not found.", code="not_found", param=param
    )


def _tenant(http: Request) -> str:
    return getattr(http.state, "tenant", "")


def _json(body: ResponseObject | ResponseDeleted) -> Response:
    # by_alias: a JSON-schema text format's "schema" key is an alias of ``schema_``.
    return Response(body.model_dump_json(by_alias=True), media_type="application/json")


@router.post("/v1/responses", response_model=ResponseObject, responses=STREAM_EVENTS)
async def create_response(req: ResponsesRequest, runtime: RuntimeDep, http: Request):
    """Create a response (streamed as ``response.*`` server-sent events when ``stream``).

    Args:
        req: The Responses request body.
        runtime: The server runtime.
        http: The HTTP request.

    Returns:
        A response object, or an SSE stream of events.
    """
    store, tenant = response_store(http, runtime), _tenant(http)
    history, previous_key = [], None
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id, tenant)
        if previous is None:
            raise not_found(req.previous_response_id, "previous_response_id")
        history, previous_key = previous.items, previous.session_key
    response_id = f"resp_{uuid.uuid4().hex}"
    try:
        chat_req = translate.chat_request(req, history, None)
        key = common.session_key(chat_req, http)
        if key is None:  # continue the chain's session; a stored first turn opens one
            key = previous_key or (response_id if req.store and store.max_entries else None)
            chat_req = chat_req.model_copy(update={"prompt_cache_key": key})
        limit = "max_output_tokens" if req.max_output_tokens is not None else None
        started = await chat.start(runtime, chat_req, http, id_prefix="resp", limit_param=limit)
    except APIError as e:
        raise translate.rename(e) from None
    base = translate.echo(req, response_id, req.model)
    items = [*history, *req.input_items()]

    def keep(final: ResponseObject) -> None:
        if req.store:
            store.put(final, [*items, *translate.as_input(final.output)], tenant, key)

    if req.stream:
        events = stream.response_events(runtime, started, base, keep)
        return generation.sse_response(runtime, events, http)
    outputs = await generation.collect_choices(
        runtime, started.streams, [started.rid], http, 1, started.tally
    )
    output, reason = outputs[0], outputs[0].finish.finish_reason
    builder = OutputBuilder(started.config)
    for delta in output.deltas:  # as streamed: the same items, the same token counts
        builder.feed(delta.text, len(delta.token_ids))
    builder.finish(reason)
    final = stream.final_response(runtime, base, builder, reason, started.tally)
    keep(final)
    return _json(final)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject)
async def get_response(response_id: str, runtime: RuntimeDep, http: Request):
    """A stored response, as it was returned.

    Args:
        response_id: Its id.
        runtime: The server runtime.
        http: The HTTP request (the caller's tenant).

    Returns:
        The response object; 404 when unknown, expired or another tenant's.
    """
    entry = response_store(http, runtime).get(response_id, _tenant(http))
    if entry is None:
        raise not_found(response_id)
    return _json(entry.response)


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted)
async def delete_response(response_id: str, runtime: RuntimeDep, http: Request):
    """Forget a stored response (a response continuing it keeps its own copy).

    Args:
        response_id: Its id.
        runtime: The server runtime.
        http: The HTTP request (the caller's tenant).

    Returns:
        ``{"id", "object": "response.deleted", "deleted": true}``; 404 when there is none.
    """
    if not response_store(http, runtime).delete(response_id, _tenant(http)):
        raise not_found(response_id)
    return _json(ResponseDeleted(id=response_id))
