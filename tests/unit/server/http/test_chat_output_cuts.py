"""A cut response's finish and a response's reasoning-token count (routes/chat_output.py).

A response cut by ``max_tokens`` in the middle of a tool call is reported as ``length``; the
unfinished call is neither a call nor content, streamed or not. ``reasoning_tokens`` counts the
generated tokens that were reasoning, so it never exceeds ``completion_tokens``, however the
reasoning text would tokenise again. Both the non-streaming body (``chat_completion``) and the
streaming chunks (``ChatChunks``) are checked, with the engine's events built by hand.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from moeserve.server.engine.events import DeltaEvent, FinishEvent
from moeserve.server.http.protocol import ChatCompletionRequest
from moeserve.server.http.routes.chat_output import (
    ChatChunks,
    ChoiceAssembler,
    OutputConfig,
    chat_completion,
)
from moeserve.server.http.routes.generation import ChoiceOutput, Tally

ADD = {"type": "function", "function": {"name": "add", "parameters": {}}}
FIRST = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
CUT = FIRST + '\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b'  # the second call, cut
QWEN = OutputConfig(tool_format="qwen", tools=[ADD])
THINK = OutputConfig(reasoning=("think", True))


def runtime() -> SimpleNamespace:
    """What the output code reads of a runtime.

    ``encode`` splits text into characters: tokenising the reasoning again finds far more
    tokens than were generated.
    """
    tokenizer = SimpleNamespace(encode=list, token_bytes=lambda i: b"x")
    return SimpleNamespace(tokenizer=tokenizer, fingerprint="fp")


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def events(text: str, per_token: int, reason: str) -> tuple[list[DeltaEvent], FinishEvent]:
    """The engine's deltas for ``text``, ``per_token`` characters a token, and its finish."""
    pieces = [text[i : i + per_token] for i in range(0, len(text), per_token)]
    deltas = [DeltaEvent(0, p, [i]) for i, p in enumerate(pieces)]
    return deltas, FinishEvent(0, reason, 5, len(pieces), 0)


def body(config: OutputConfig, text: str, per_token: int, reason: str) -> dict[str, Any]:
    deltas, finish = events(text, per_token, reason)
    tally = Tally(prompt=5)
    tally.add(finish)
    out = chat_completion(runtime(), request(), "id", config, [ChoiceOutput(finish, deltas)], tally)  # type: ignore[arg-type]
    return json.loads(out.model_dump_json())


def stream(config: OutputConfig, text: str, per_token: int, reason: str) -> list[dict[str, Any]]:
    deltas, finish = events(text, per_token, reason)
    req = request(stream=True, stream_options={"include_usage": True})
    writer = ChatChunks(runtime(), req, "id", config)  # type: ignore[arg-type]
    tally = Tally(prompt=5)
    chunks = [c for d in deltas for c in writer.delta(0, d)]
    tally.add(finish)
    chunks += [*writer.finish(0, finish), writer.usage(tally)]
    return [json.loads(c) for c in chunks]


# ----- a cut tool call ------------------------------------------------------------------------


@pytest.mark.parametrize("per_token", [1, 4, 1000])
def test_a_call_cut_by_max_tokens_is_length_and_not_a_call(per_token: int) -> None:
    [choice] = body(QWEN, CUT, per_token, "length")["choices"]
    assert choice["finish_reason"] == "length"
    message = choice["message"]
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == ['{"a": 1, "b": 2}']
    assert not message["content"]  # the cut call's markup is not content either


@pytest.mark.parametrize("per_token", [1, 4, 1000])
def test_a_streamed_cut_call_ends_with_length_and_no_markup(per_token: int) -> None:
    chunks = stream(QWEN, CUT, per_token, "length")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert all("<tool_call>" not in (d.get("content") or "") for d in deltas)
    assert not "".join(d.get("content") or "" for d in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_a_cut_right_after_the_first_call_keeps_it_and_says_length() -> None:
    for tail in ("\n", "\n<tool_", "\n<tool_call>", "\n<tool_call>\n{"):
        [choice] = body(QWEN, FIRST + tail, 3, "length")["choices"]
        assert choice["finish_reason"] == "length", tail
        assert len(choice["message"]["tool_calls"]) == 1 and not choice["message"]["content"]


def test_calls_the_model_ended_itself_are_tool_calls() -> None:
    [choice] = body(QWEN, FIRST, 3, "stop")["choices"]
    assert choice["finish_reason"] == "tool_calls"
    chunks = stream(QWEN, FIRST, 3, "stop")
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


def test_an_unfinished_call_the_model_ended_is_still_content() -> None:
    """Only a cut drops the call's text; a model that stops inside markup wrote text."""
    [choice] = body(QWEN, "Hi <tool_call>\n{oops", 3, "stop")["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "Hi <tool_call>\n{oops"


def test_plain_text_cut_keeps_its_text() -> None:
    [choice] = body(QWEN, "Hello there", 2, "length")["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "Hello there"


# ----- reasoning tokens -----------------------------------------------------------------------

REASONED = "Let me think about this.</think>\n\nThe answer is 4."


@pytest.mark.parametrize("per_token", [1, 3, 7])
def test_reasoning_tokens_count_generated_tokens(per_token: int) -> None:
    usage = body(THINK, REASONED, per_token, "stop")["usage"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    # Every token up to the one that closes the block (which may carry text after it too).
    closing = (REASONED.index("</think>") + len("</think>") - 1) // per_token + 1
    assert reasoning == closing
    assert 0 < reasoning < usage["completion_tokens"]
    chunks = stream(THINK, REASONED, per_token, "stop")
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == reasoning


def test_reasoning_tokens_never_exceed_completion_tokens() -> None:
    """Re-tokenising the reasoning (here: one token per character) finds more than was made."""
    usage = body(THINK, "abc " * 20, 8, "length")["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"]
    usage = body(THINK, "abc " * 20 + "</think>x", 8, "stop")["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] <= usage["completion_tokens"]


def test_no_reasoning_no_reasoning_tokens() -> None:
    usage = body(OutputConfig(), "Just an answer.", 2, "stop")["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


def test_harmony_analysis_tokens_are_reasoning() -> None:
    tokens = ["<|channel|>", "analysis", "<|message|>", "Think", ".", "<|end|>", "<|start|>"]
    tokens += ["assistant", "<|channel|>", "final", "<|message|>", "Hi", "."]
    choice = ChoiceAssembler(OutputConfig(tool_format="harmony"))
    for token in tokens:
        choice.feed(token, 1)
    choice.finish()
    assert choice.message().reasoning_content == "Think."
    assert choice.reasoning_tokens == 4  # from <|message|> (it opens the body) to <|end|>


# ----- both reasoning field names -------------------------------------------------------------


def test_reasoning_is_sent_under_both_names() -> None:
    [choice] = body(THINK, REASONED, 3, "stop")["choices"]
    message = choice["message"]
    assert message["reasoning_content"] == message["reasoning"] == "Let me think about this."
    chunks = stream(THINK, REASONED, 3, "stop")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    pieces = [d for d in deltas if "reasoning_content" in d or "reasoning" in d]
    assert pieces and all(d["reasoning"] == d["reasoning_content"] for d in pieces)
    assert "".join(d["reasoning"] for d in pieces) == "Let me think about this."


def test_no_reasoning_is_null_under_both_names() -> None:
    [choice] = body(OutputConfig(), "Hi.", 2, "stop")["choices"]
    assert choice["message"]["reasoning_content"] is None and choice["message"]["reasoning"] is None
    deltas = [
        c["choices"][0]["delta"] for c in stream(OutputConfig(), "Hi.", 2, "stop") if c["choices"]
    ]
    assert all("reasoning" not in d and "reasoning_content" not in d for d in deltas)
