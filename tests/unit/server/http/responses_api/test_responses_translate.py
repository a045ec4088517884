"""A Responses request as a chat request and the output back (responses_api/translate.py)."""

from __future__ import annotations

from typing import Any

import pytest

from moeserve.server.http.errors import APIError
from moeserve.server.http.protocol import NamedToolChoice
from moeserve.server.http.responses_api import translate
from moeserve.server.http.responses_api.objects import (
    FunctionCallItem,
    MessageItem,
    OutputText,
    ReasoningItem,
    ReasoningText,
)
from moeserve.server.http.responses_api.protocol import InputItem, ResponsesRequest

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The forecast.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", **fields})


def messages(**fields: Any) -> list[dict[str, Any]]:
    chat = translate.chat_request(request(**fields), [], None)
    return [m.model_dump(exclude_none=True) for m in chat.messages]


def test_a_string_is_one_user_message_and_instructions_the_system_one() -> None:
    assert messages(input="Hi", instructions="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_message_items_keep_their_roles_and_join_their_text_parts() -> None:
    items = [
        {"role": "developer", "content": "Rules."},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Hello "},
                {"type": "input_text", "text": "there"},
            ],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
    ]
    out = messages(input=items)
    assert [(m["role"], m["content"]) for m in out] == [
        ("developer", "Rules."),
        ("user", "Hello there"),
        ("assistant", "Hi!"),
    ]


def test_calls_join_the_assistant_turn_and_outputs_answer_them() -> None:
    items = [
        {"role": "user", "content": "Weather?"},
        {
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "Need a tool."}],
        },
        {"role": "assistant", "content": "Let me look."},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"a":1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {
            "type": "function_call_output",
            "call_id": "c2",
            "output": [{"type": "input_text", "text": "rain"}],
        },
    ]
    out = messages(input=items)
    assert out[1] == {
        "role": "assistant",
        "content": "Let me look.",
        "reasoning_content": "Need a tool.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"a":1}'},
            },
        ],
    }
    assert out[2:] == [
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    ]


def test_a_call_without_a_message_opens_a_turn_without_content() -> None:
    items = [
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Short."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
    ]
    turn = messages(input=items)[1]
    assert turn["role"] == "assistant" and "content" not in turn
    assert turn["reasoning_content"] == "Short."  # the summary, when there is no full text
    assert [c["id"] for c in turn["tool_calls"]] == ["c1"]


def test_reasoning_with_no_assistant_turn_after_it_is_dropped() -> None:
    items = [
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "Hmm."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    out = messages(input=items)
    assert "reasoning_content" not in out[1]


def test_settings_map_to_their_chat_fields() -> None:
    req = request(
        input="Hi",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        max_output_tokens=7,
        temperature=0.5,
        top_p=0.9,
        user="u1",
        text={
            "format": {
                "type": "json_schema",
                "name": "x",
                "schema": {"type": "object"},
                "strict": True,
            }
        },
    )
    chat = translate.chat_request(req, [], None)
    assert chat.max_completion_tokens == 7 and chat.temperature == 0.5 and chat.top_p == 0.9
    assert chat.parallel_tool_calls is False and chat.user == "u1"
    assert chat.tool_dicts() == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The forecast.",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        }
    ]
    assert isinstance(chat.tool_choice, NamedToolChoice)
    assert chat.tool_choice.function.name == "get_weather"
    fmt = chat.response_format
    assert fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None
    assert fmt.json_schema.name == "x" and fmt.json_schema.schema_ == {"type": "object"}
    assert fmt.json_schema.strict is True


def test_defaults_are_chat_defaults() -> None:
    chat = translate.chat_request(request(input="Hi"), [], None)
    assert chat.temperature == 1.0 and chat.top_p == 1.0 and chat.max_completion_tokens is None
    assert chat.tools is None and chat.tool_choice is None and chat.response_format is None
    json_object = request(input="Hi", text={"format": {"type": "json_object"}})
    assert translate.chat_request(json_object, [], None).response_format.type == "json_object"


def test_history_comes_first_and_instructions_before_it() -> None:
    history = [
        InputItem(type="message", role="user", content="One"),
        InputItem(type="message", role="assistant", content="Two"),
    ]
    chat = translate.chat_request(request(input="Three", instructions="Sys"), history, "key")
    assert [m.content for m in chat.messages] == ["Sys", "One", "Two", "Three"]
    assert chat.prompt_cache_key == "key"


def test_nothing_to_answer_is_a_400_on_input() -> None:
    with pytest.raises(APIError) as info:
        translate.chat_request(request(), [], None)
    assert info.value.status == 400 and info.value.param == "input"


def test_output_items_continue_as_the_same_turn() -> None:
    output = [
        ReasoningItem(id="rs_1", status="completed", content=[ReasoningText(text="Think.")]),
        MessageItem(id="msg_1", status="completed", content=[OutputText(text="Calling.")]),
        FunctionCallItem(
            id="fc_1", status="completed", call_id="c9", name="f", arguments='{"x": 1}'
        ),
    ]
    items = [InputItem(type="message", role="user", content="Go"), *translate.as_input(output)]
    out = [m.model_dump(exclude_none=True) for m in translate.conversation(items)]
    assert out[1] == {
        "role": "assistant",
        "content": "Calling.",
        "reasoning_content": "Think.",
        "tool_calls": [
            {"id": "c9", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
        ],
    }


def test_echo_repeats_the_settings() -> None:
    req = request(
        input="Hi",
        instructions="Sys",
        tools=[WEATHER],
        tool_choice="required",
        metadata={"a": "b"},
        store=False,
        text={"format": {"type": "json_object"}},
    )
    body = translate.echo(req, "resp_1", "m").model_dump(by_alias=True)
    assert body["id"] == "resp_1" and body["status"] == "in_progress" and body["output"] == []
    assert body["instructions"] == "Sys" and body["tool_choice"] == "required"
    assert body["tools"][0]["name"] == "get_weather" and body["metadata"] == {"a": "b"}
    assert body["store"] is False and body["text"] == {"format": {"type": "json_object"}}
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["usage"] is None


@pytest.mark.parametrize(
    ("param", "message", "renamed", "renamed_message"),
    [
        (
            "messages",
            "your messages are 9 bytes long; reduce the length of the messages",
            "input",
            "your input is 9 bytes long; reduce the length of the input",
        ),
        ("max_completion_tokens", "x", "max_output_tokens", "x"),
        (
            "response_format",
            "response_format cannot be combined with a required tool call",
            "text.format",
            "text.format cannot be combined with a required tool call",
        ),
        ("model", "no such model", "model", "no such model"),
        (None, "response_format ...", None, "text.format ..."),
    ],
)
def test_rename_names_the_responses_fields(param, message, renamed, renamed_message) -> None:
    error = translate.rename(APIError(400, message, param=param))
    assert (error.param, error.message) == (renamed, renamed_message)
