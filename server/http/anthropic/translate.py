"""An Anthropic Messages request, translated into the chat request the shared pipeline runs.

The OpenAI ``ChatCompletionRequest`` is moeserve's one conversation model
(``routes/chat.start``). The mapping, turn by turn:

* ``system`` (a string or text blocks) becomes the first message, role ``system``;
* a user message's text blocks become one ``user`` message (blocks joined by newlines), and
  each ``tool_result`` block a ``tool`` message answering ``tool_use_id`` (an ``is_error``
  result reads ``Error: ...``: chat templates have no error flag), in the blocks' order;
* an assistant message becomes one ``assistant`` message: its text blocks the content, its
  ``thinking`` blocks the ``reasoning_content`` (which templates that keep earlier reasoning
  read), its ``tool_use`` blocks the ``tool_calls`` (input objects as JSON text);
  ``redacted_thinking`` is left out (it is Anthropic's ciphertext).

``tools`` become functions (``input_schema`` the ``parameters``); ``tool_choice`` ``any`` is
chat's ``required`` and ``tool`` a named function (both constrained alike),
``disable_parallel_tool_use`` is ``parallel_tool_calls: false``. ``stop_sequences`` are
``stop``, ``metadata.user_id`` the prompt-cache session (else the ``X-Session-ID`` header,
which ``routes/common.session_key`` reads), and ``thinking`` sets the template's
``enable_thinking`` where the template has that switch (no thinking budget is enforced:
``max_tokens`` bounds the reasoning and the answer together).

A conversation ending with an assistant turn (Anthropic's "prefill") is refused: the chat
template closes that turn and opens a new one, so the answer could not continue it.
Knows both APIs' request shapes; knows nothing of the engine or of responses.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from moeserve.server.http.anthropic.protocol import (
    CountTokensRequest,
    MessageParam,
    MessagesRequest,
    TextBlockParam,
    ThinkingBlockParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)
from moeserve.server.http.errors import APIError
from moeserve.server.http.protocol import ChatCompletionRequest


def system_message(system: str | list[TextBlockParam] | None) -> list[dict[str, Any]]:
    """The system prompt as chat messages.

    Args:
        system: ``system``: a string or text blocks.

    Returns:
        One ``system`` message, or none when there is no system prompt.
    """
    if system is None:
        return []
    text = system if isinstance(system, str) else "\n".join(b.text for b in system)
    return [{"role": "system", "content": text}]


def user_messages(message: MessageParam) -> list[dict[str, Any]]:
    """A user turn as chat messages: its text as ``user``, its tool results as ``tool``.

    Args:
        message: A message with role ``user``.

    Returns:
        The messages, in the order of the blocks they come from.
    """
    if isinstance(message.content, str):
        return [{"role": "user", "content": message.content}]
    out: list[dict[str, Any]] = []
    text: list[str] = []
    for block in message.content:
        if isinstance(block, TextBlockParam):
            text.append(block.text)
        elif isinstance(block, ToolResultBlockParam):
            if text:  # text before a result stays before it
                out.append({"role": "user", "content": "\n".join(text)})
                text = []
            result = block.text()
            content = f"Error: {result}" if block.is_error else result
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
    if text or not out:
        out.append({"role": "user", "content": "\n".join(text)})
    return out


def assistant_message(message: MessageParam) -> dict[str, Any]:
    """An assistant turn as one chat message: content, reasoning and tool calls.

    Args:
        message: A message with role ``assistant``.

    Returns:
        The message.
    """
    if isinstance(message.content, str):
        return {"role": "assistant", "content": message.content}
    text, thinking, calls = [], [], []
    for block in message.content:
        if isinstance(block, TextBlockParam):
            text.append(block.text)
        elif isinstance(block, ThinkingBlockParam):
            thinking.append(block.thinking)
        elif isinstance(block, ToolUseBlockParam):
            arguments = json.dumps(block.input, ensure_ascii=False)
            function = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": function})
    out: dict[str, Any] = {"role": "assistant", "content": "\n".join(text)}
    if thinking:
        out["reasoning_content"] = "\n".join(thinking)
    if calls:
        out["tool_calls"] = calls
    return out


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The whole conversation as chat messages.

    Args:
        req: The Anthropic request.

    Returns:
        The messages, the system prompt first.

    Raises:
        APIError: 400 when the last message is the assistant's (a prefill).
    """
    if req.messages[-1].role == "assistant":
        raise APIError(
            400,
            "messages: the last message is the assistant's; this server does not continue "
            "a prefilled assistant turn, end with a user message",
            param="messages",
        )
    out = system_message(req.system)
    for message in req.messages:
        if message.role == "user":
            out.extend(user_messages(message))
        else:
            out.append(assistant_message(message))
    return out


def tool_fields(req: CountTokensRequest) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` in chat's terms.

    Args:
        req: The Anthropic request.

    Returns:
        The chat request's tool fields (empty without tools).
    """
    if not req.tools:
        return {}
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.input_schema,
            },
        }
        for t in req.tools
    ]
    fields: dict[str, Any] = {"tools": tools}
    choice = req.tool_choice
    if choice is not None:
        named = {"type": "function", "function": {"name": choice.name}}
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
            choice.type, named
        )
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return fields


def template_kwargs(req: CountTokensRequest, chat_template: str | None) -> dict[str, Any] | None:
    """``thinking`` as the template's ``enable_thinking`` switch, where it has one.

    Args:
        req: The Anthropic request.
        chat_template: The served model's chat template source.

    Returns:
        ``{"enable_thinking": bool}``, or None (no ``thinking`` field, or no switch).
    """
    if req.thinking is None or "enable_thinking" not in (chat_template or ""):
        return None
    return {"enable_thinking": req.thinking.type != "disabled"}


def to_chat(req: CountTokensRequest, chat_template: str | None = None) -> ChatCompletionRequest:
    """Translate an Anthropic request into the chat request ``chat.start`` runs.

    Args:
        req: A ``MessagesRequest`` (or a ``CountTokensRequest``: no generation fields).
        chat_template: The served model's chat template source (its thinking switch).

    Returns:
        The chat request.

    Raises:
        APIError: 400 for a prefill, or what the chat request refuses (named as there).
    """
    body: dict[str, Any] = {
        "model": req.model,
        "messages": chat_messages(req),
        **tool_fields(req),
        "chat_template_kwargs": template_kwargs(req, chat_template),
    }
    if isinstance(req, MessagesRequest):
        body.update(
            max_tokens=req.max_tokens,
            stop=req.stop_sequences,
            temperature=req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            prompt_cache_key=req.session(),
            stream=req.stream,
        )
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:  # all but unreachable: protocol.py checks the same first
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}") from None
