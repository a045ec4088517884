"""The Anthropic Messages API's requests: validation and translation into the chat request.

Validation is anthropic/protocol.py's; the translation into the chat request the shared
pipeline runs is anthropic/translate.py's.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from moeserve.server.http.anthropic.protocol import CountTokensRequest, MessagesRequest
from moeserve.server.http.anthropic.translate import to_chat
from moeserve.server.http.errors import APIError
from moeserve.server.http.protocol import NamedToolChoice

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
THINKING_TEMPLATE = "{% if enable_thinking %}<think>{% endif %}"


def request(**fields: Any) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    return MessagesRequest.model_validate({**body, **fields})


def refusal(**fields: Any) -> str:
    with pytest.raises(ValidationError) as info:
        request(**fields)
    return str(info.value)


def chat_dicts(req: MessagesRequest) -> list[dict[str, Any]]:
    return [m.template_dict() for m in to_chat(req).messages]


def test_a_text_conversation_maps_turn_for_turn_with_the_system_prompt_first() -> None:
    req = request(
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ],
    )
    assert chat_dicts(req) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]


def test_tool_use_thinking_and_tool_results_become_chat_calls_reasoning_and_tool_messages() -> None:
    req = request(
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Two calls.", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "t1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "t2",
                        "name": "get_weather",
                        "input": {"city": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "t2",
                        "content": [{"type": "text", "text": "no data"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
    )
    messages = chat_dicts(req)
    assistant = messages[1]
    assert assistant["content"] == "Checking." and assistant["reasoning_content"] == "Two calls."
    calls = assistant["tool_calls"]
    assert [c["id"] for c in calls] == ["t1", "t2"]
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Rome"}
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: no data"},
        {"role": "user", "content": "And tomorrow?"},
    ]


def test_tools_and_tool_choice_map_onto_chats_constrained_choices() -> None:
    chat = to_chat(request(tools=[WEATHER]))
    assert chat.tool_choice is None and chat.parallel_tool_calls
    tool = chat.tools[0].function
    assert tool.name == "get_weather" and tool.parameters == WEATHER["input_schema"]
    assert to_chat(request(tools=[WEATHER], tool_choice={"type": "any"})).tool_choice == "required"
    assert to_chat(request(tools=[WEATHER], tool_choice={"type": "none"})).tool_choice == "none"
    named = to_chat(
        request(
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        )
    )
    assert isinstance(named.tool_choice, NamedToolChoice)
    assert named.tool_choice.function.name == "get_weather" and not named.parallel_tool_calls


def test_sampling_fields_stop_sequences_and_the_session_key_carry_over() -> None:
    chat = to_chat(
        request(
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            stop_sequences=["END"],
            metadata={"user_id": "user-1"},
            stream=True,
        )
    )
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.top_k) == (7, 0.5, 0.9, 40)
    assert chat.stop_list() == ["END"] and chat.stream
    assert chat.prompt_cache_key == "user-1"
    plain = to_chat(request())
    assert (plain.top_p, plain.top_k, plain.prompt_cache_key) == (1.0, 0, None)


def test_thinking_sets_enable_thinking_only_where_the_template_has_the_switch() -> None:
    on = request(thinking={"type": "enabled", "budget_tokens": 1024})
    off = request(thinking={"type": "disabled"})
    assert to_chat(on, THINKING_TEMPLATE).chat_template_kwargs == {"enable_thinking": True}
    assert to_chat(off, THINKING_TEMPLATE).chat_template_kwargs == {"enable_thinking": False}
    assert to_chat(on, "{{ messages }}").chat_template_kwargs is None
    assert to_chat(request(), THINKING_TEMPLATE).chat_template_kwargs is None


def test_count_tokens_translates_without_generation_fields() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    chat = to_chat(CountTokensRequest.model_validate(body))
    assert chat.max_tokens is None and chat.tools is not None


def test_a_final_assistant_turn_is_refused_as_an_unsupported_prefill() -> None:
    req = request(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{"}]
    )
    with pytest.raises(APIError) as info:
        to_chat(req)
    assert info.value.status == 400 and "prefill" in info.value.message


def test_max_tokens_is_required() -> None:
    with pytest.raises(ValidationError) as info:
        MessagesRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
    assert info.value.errors()[0]["loc"] == ("max_tokens",)


def test_unknown_fields_and_cache_control_are_ignored() -> None:
    req = request(
        betas=["x"],
        context_management={"edits": []},
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
            }
        ],
    )
    assert chat_dicts(req) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image'"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "image"}],
                            }
                        ],
                    }
                ]
            },
            "'image'",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    }
                ]
            },
            "a user message cannot hold a 'tool_use' block",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "a string or a list of content blocks"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"tool_choice": {"type": "any"}}, "needs at least one tool"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "other"}}, "not in tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "needs the tool's 'name'"),
        ({"temperature": 1.5}, "temperature"),
        ({"max_tokens": "16"}, "max_tokens"),  # strict types, as in the chat request
        ({"metadata": {"user_id": "x" * 300}}, "at most 256 characters"),
        ({"stop_sequences": ["s"] * 17}, "stop_sequences"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason(fields: dict[str, Any], words: str) -> None:
    assert words in refusal(**fields)
