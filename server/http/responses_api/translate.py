"""A Responses request into the one conversation model, and the answer's pieces back.

The chat request (``ChatCompletionRequest``) is moeserve's conversation model: a Responses
request becomes one, and ``routes/chat.start`` renders, constrains and submits it. Input
items become chat messages thus:

* ``instructions`` is a system message, first (never stored: it does not carry over to a
  response that continues this one, as OpenAI's does not);
* a ``message`` item is a message of its role, its text parts joined;
* ``reasoning`` items are held and become ``reasoning_content`` of the next assistant turn
  (dropped when no assistant turn follows);
* an assistant ``message`` starts an assistant turn; ``function_call`` items join the open
  assistant turn as its ``tool_calls`` (or open one, without content);
* a ``function_call_output`` item is a ``tool`` message answering its ``call_id``.

The settings map one to one: ``max_output_tokens`` to ``max_completion_tokens``, ``text.format``
to ``response_format``, function tools to chat tools, ``tool_choice`` to its chat spelling.
Errors the pipeline raises name chat's fields; ``rename`` names the Responses ones instead.
Knows both APIs' shapes; knows nothing of the engine, HTTP or the store.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError

from moeserve.server.http.errors import APIError
from moeserve.server.http.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionSpec,
    JsonSchemaSpec,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    ToolSpec,
)
from moeserve.server.http.responses_api.objects import (
    FormatEcho,
    FunctionCallItem,
    MessageItem,
    OutputItem,
    ReasoningItem,
    ResponseObject,
    TextEcho,
)
from moeserve.server.http.responses_api.protocol import (
    ContentPart,
    InputItem,
    ResponsesRequest,
    ToolChoiceFunction,
)

# Chat's field names in errors from the shared pipeline -> the Responses API's.
_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}


def conversation(items: list[InputItem]) -> list[ChatMessage]:
    """Input items as chat messages (see the module docstring for the rules).

    Args:
        items: The conversation's items, oldest first (validated: each has its fields).

    Returns:
        The messages.
    """
    messages: list[ChatMessage] = []
    reasoning: list[str] = []  # held for the next assistant turn
    turn: ChatMessage | None = None  # the open assistant turn function calls join
    for item in items:
        if item.type == "reasoning":
            reasoning.append(item.text())
            turn = None
        elif item.type == "function_call":
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if turn is None:
                turn = _assistant(None, reasoning)
                messages.append(turn)
            turn.tool_calls = [*(turn.tool_calls or []), call]
        elif item.type == "function_call_output":
            answer = ChatMessage(role="tool", tool_call_id=item.call_id, content=item.text())
            messages.append(answer)
            turn = None
        elif item.role == "assistant":
            turn = _assistant(item.text(), reasoning)
            messages.append(turn)
        else:
            messages.append(ChatMessage(role=item.role or "user", content=item.text()))
            reasoning, turn = [], None
    return messages


def _assistant(content: str | None, reasoning: list[str]) -> ChatMessage:
    """An assistant turn, taking the held reasoning (and emptying the holder)."""
    text = "".join(reasoning)
    reasoning.clear()
    return ChatMessage(role="assistant", content=content, reasoning_content=text or None)


def chat_request(
    req: ResponsesRequest, history: list[InputItem], session_key: str | None
) -> ChatCompletionRequest:
    """The chat request a Responses request stands for.

    Args:
        req: The Responses request.
        history: The stored conversation it continues (``previous_response_id``), or [].
        session_key: The prompt-cache session to use, or None for the request's own.

    Returns:
        The chat request.

    Raises:
        APIError: 400 when there is nothing to answer.
    """
    messages = conversation([*history, *req.input_items()])
    if req.instructions is not None:
        messages.insert(0, ChatMessage(role="system", content=req.instructions))
    if not messages:
        raise APIError(400, "input must hold at least one item", param="input")
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_completion_tokens": req.max_output_tokens,
        "parallel_tool_calls": req.parallel_tool_calls,
        "user": req.user,
        "prompt_cache_key": session_key or req.prompt_cache_key,
        "seed": req.seed,
    }
    if req.temperature is not None:
        fields["temperature"] = req.temperature
    if req.top_p is not None:
        fields["top_p"] = req.top_p
    if req.tools:
        fields["tools"] = [
            ToolSpec(
                function=FunctionSpec(
                    name=t.name or "",
                    description=t.description,
                    parameters=t.parameters,
                    strict=t.strict,
                )
            )
            for t in req.tools
        ]
    if isinstance(req.tool_choice, ToolChoiceFunction):
        fields["tool_choice"] = NamedToolChoice(function=NamedFunction(name=req.tool_choice.name))
    elif req.tool_choice is not None:
        fields["tool_choice"] = req.tool_choice
    fmt = req.text_format()
    if fmt.type == "json_schema":
        spec = JsonSchemaSpec(
            name=fmt.name or "response",
            schema=fmt.schema_ or {},
            strict=fmt.strict,
            description=fmt.description,
        )
        fields["response_format"] = ResponseFormat(type="json_schema", json_schema=spec)
    elif fmt.type == "json_object":
        fields["response_format"] = ResponseFormat(type="json_object")
    try:
        return ChatCompletionRequest(**fields)
    except ValidationError as e:  # the Responses request was checked: a conversation's shape
        raise APIError(400, str(e.errors()[0]["msg"]), param="input") from None


def as_input(output: list[OutputItem]) -> list[InputItem]:
    """A response's output items as the input items of the conversation that continues it.

    Args:
        output: The output items.

    Returns:
        The same turn as input items.
    """
    items: list[InputItem] = []
    for item in output:
        if isinstance(item, MessageItem):
            parts = [ContentPart(type="output_text", text=p.text) for p in item.content]
            items.append(InputItem(type="message", role="assistant", content=parts))
        elif isinstance(item, ReasoningItem):
            parts = [ContentPart(type="reasoning_text", text=p.text) for p in item.content]
            items.append(InputItem(type="reasoning", content=parts))
        elif isinstance(item, FunctionCallItem):
            items.append(
                InputItem(
                    type="function_call",
                    call_id=item.call_id,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
    return items


def echo(req: ResponsesRequest, response_id: str, model: str) -> ResponseObject:
    """The response before any output: ``in_progress``, with the request's settings.

    Args:
        req: The request.
        response_id: The response's id.
        model: The model name to report (the request's).

    Returns:
        The response object.
    """
    fmt, verbosity = req.text_format(), req.text.verbosity if req.text is not None else None
    return ResponseObject(
        id=response_id,
        created_at=int(time.time()),
        status="in_progress",
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        model=model,
        parallel_tool_calls=req.parallel_tool_calls,
        previous_response_id=req.previous_response_id,
        reasoning=req.reasoning,
        store=req.store,
        temperature=1.0 if req.temperature is None else req.temperature,
        text=TextEcho(format=FormatEcho(**fmt.model_dump(by_alias=True)), verbosity=verbosity),
        tool_choice=req.tool_choice or "auto",
        tools=list(req.tools or []),
        top_p=1.0 if req.top_p is None else req.top_p,
        user=req.user,
        prompt_cache_key=req.prompt_cache_key,
        metadata=dict(req.metadata or {}),
    )


def rename(error: APIError) -> APIError:
    """A pipeline error naming the Responses API's fields instead of chat's.

    Args:
        error: From ``chat.start`` (or the validation of the chat request).

    Returns:
        The same error, its ``param`` (and the field names in its message) renamed.
    """
    if error.param in _PARAMS:
        old = error.param
        error.param = _PARAMS[old]
        # The context-length errors say "your messages are": "your input is".
        text = error.message.replace("your messages are", "your input is")
        error.message = text.replace(old, error.param)
    error.message = error.message.replace("response_format", "text.format")
    return error
