"""The response models of ``server.http.responses``: which keys are null and which absent.

Clients parse these bytes (the ``openai`` package, LangChain, LlamaIndex): a choice's
``logprobs`` and ``finish_reason`` are always there, a delta carries only what it changes, a
stream's chunks have ``usage`` (null until the last) only when the request asked for it, and a
chunk is always one SSE ``data:`` line.
"""

from __future__ import annotations

import json

from moeserve.server.http.errors import APIError
from moeserve.server.http.responses import (
    AssistantMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionChunk,
    CompletionTokensDetails,
    Delta,
    Envelope,
    FunctionDelta,
    LegacyUsage,
    ToolCallDelta,
    Usage,
    sse_safe,
)


def _chat_envelope(include_usage: bool) -> Envelope:
    return Envelope(ChatCompletionChunk, "chatcmpl-1", "tiny", "fp_x", include_usage)


def test_a_chunk_keeps_its_nulls_and_key_order() -> None:
    data = _chat_envelope(False).write([ChatChunkChoice(index=0, delta=Delta(content="hi"))])
    assert " " not in data  # compact
    body = json.loads(data)
    assert list(body) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"] == [
        {"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}
    ]


def test_usage_is_null_until_the_last_chunk_only_when_asked_for() -> None:
    out = _chat_envelope(True)
    first = json.loads(out.write([ChatChunkChoice(index=0, delta=Delta(content="a"))]))
    details = CompletionTokensDetails(reasoning_tokens=2)
    last = json.loads(out.write([], Usage.count(5, 3, 4, completion_tokens_details=details)))
    assert first["usage"] is None
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    legacy = Envelope(CompletionChunk, "cmpl-1", "tiny", "fp_x", False)
    chunk = json.loads(legacy.write([CompletionChoice(index=3, text="x", finish_reason="stop")]))
    assert "usage" not in chunk
    assert chunk["choices"] == [
        {"index": 3, "text": "x", "logprobs": None, "finish_reason": "stop"}
    ]
    assert "completion_tokens_details" not in LegacyUsage.count(1, 2, 0).model_dump()


def test_an_envelope_writes_each_chunk_with_only_its_own_choices() -> None:
    out = _chat_envelope(False)
    out.write([ChatChunkChoice(index=0, delta=Delta(content="a"))])
    second = json.loads(out.write([ChatChunkChoice(index=1, delta=Delta(), finish_reason="stop")]))
    assert second["choices"] == [
        {"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]


def test_deltas_leave_out_what_they_do_not_change() -> None:
    start = ToolCallDelta(
        index=0, id="call_1", type="function", function=FunctionDelta(name="f", arguments="")
    )
    more = ToolCallDelta(index=0, function=FunctionDelta(arguments='{"a"'))
    delta = Delta(role="assistant", tool_calls=[start, more])
    assert json.loads(delta.model_dump_json()) == {
        "role": "assistant",
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            },
            {"index": 0, "function": {"arguments": '{"a"'}},
        ],
    }
    assert Delta(content="").model_dump() == {"content": ""}  # empty text is still said


def test_a_message_says_null_for_what_it_lacks() -> None:
    assert AssistantMessage(content=None).model_dump() == {
        "role": "assistant",
        "content": None,
        "reasoning_content": None,
        "reasoning": None,
        "tool_calls": None,
    }


def test_a_chunk_is_one_line_whatever_the_text_holds() -> None:
    text = "a\nb\r\x85c\u2028d\u2029e\x1cf é 🙂"
    data = _chat_envelope(False).write([ChatChunkChoice(index=0, delta=Delta(content=text))])
    assert data.splitlines() == [data]  # str.splitlines knows the most line breaks
    assert json.loads(data)["choices"][0]["delta"]["content"] == text
    assert "é 🙂" in data  # other characters stay UTF-8, not escapes
    assert sse_safe('{"a":1}') == '{"a":1}'


def test_an_error_event_is_the_errors_envelope() -> None:
    error = APIError(500, "it broke", type="server_error", code="generation_failed")
    assert json.loads(error.json()) == error.body()
    assert error.body() == {
        "error": {
            "message": "it broke",
            "type": "server_error",
            "param": None,
            "code": "generation_failed",
        }
    }
