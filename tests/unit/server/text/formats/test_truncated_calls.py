"""A generation cut inside a tool call (``finish(truncated=True)``), in every format.

When ``max_tokens`` cuts the text in the middle of a call, the call was never written: it is
not a call and its markup is not content. The calls finished before the cut stay. A model that
ends its turn inside markup (``finish()`` without ``truncated``) wrote text, which stays
content, as before. Each format's text is two calls; the cut falls at every position of the
second, and the text arrives in one piece and one character at a time. Where a format accepts a
call whose closing marker never came (its arguments complete), a cut inside that marker leaves
the call whole: its arguments are then exactly the uncut ones, never a part of them.
"""

from __future__ import annotations

import pytest

from moeserve.server.text.formats import ContentDelta, ToolCallStart, tool_format
from tests.unit.server.text.formats.helpers import TOOLS

QWEN_1 = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
QWEN_2 = (
    '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}'
    "\n</tool_call>"
)
DS = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>")
KIMI = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>")
KIMI_END = "<|tool_call_end|>"
HARMONY_HEAD = "<|channel|>commentary to=functions.{} <|constrain|>json<|message|>"

# format: (text up to the end of the first call, the second call, what may follow it)
CASES = {
    "qwen": (QWEN_1, QWEN_2, ""),
    "hermes_parameters": (
        QWEN_1.replace("arguments", "parameters"),
        QWEN_2.replace("arguments", "parameters"),
        "",
    ),
    "glm45": (
        "<tool_call>get_time\n</tool_call>",
        "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
        "<arg_key>unit</arg_key>\n<arg_value>c</arg_value>\n</tool_call>",
        "",
    ),
    "qwen_xml": (
        "<tool_call>\n<function=get_time>\n</function>\n</tool_call>",
        "\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
        "<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>",
        "",
    ),
    "deepseek_v31": (
        f"{DS[0]}{DS[1]}get_time{DS[2]}{{}}{DS[3]}",
        f'{DS[1]}get_weather{DS[2]}{{"city": "Oslo", "unit": "c"}}{DS[3]}',
        "<｜tool▁calls▁end｜>",
    ),
    "kimi_k2": (
        f"{KIMI[0]}{KIMI[1]}functions.get_time:0{KIMI[2]}{{}}{KIMI_END}",
        f'{KIMI[1]}functions.get_weather:1{KIMI[2]}{{"city": "Oslo", "unit": "c"}}{KIMI_END}',
        "<|tool_calls_section_end|>",
    ),
    "minimax_m2": (
        '<minimax:tool_call>\n<invoke name="get_time">\n</invoke>\n',
        '<invoke name="get_weather">\n<parameter name="city">Oslo</parameter>\n'
        '<parameter name="unit">c</parameter>\n</invoke>\n',
        "</minimax:tool_call>",
    ),
    "harmony": (
        HARMONY_HEAD.format("get_time") + "{}<|call|>",
        "<|start|>assistant" + HARMONY_HEAD.format("get_weather") + '{"city":"Oslo","unit":"c"}',
        "<|call|>",
    ),
}


def parse(name: str, chunks: list[str], truncated: bool) -> tuple[str, list[tuple], int]:
    """(content, the complete calls' names and arguments, calls started) of a stream."""
    parser = tool_format(name)(TOOLS)
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    events += parser.finish(truncated=truncated)
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    started = sum(isinstance(e, ToolCallStart) for e in events)
    return content, [(c.name, c.arguments) for c in parser.calls], started


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_calls_parse_when_whole(name: str) -> None:
    first, second, after = CASES[name]
    content, calls, started = parse(name, [first + second + after], truncated=False)
    assert (content, [c[0] for c in calls], started) == ("", ["get_time", "get_weather"], 2)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_cut_second_call_is_dropped(name: str) -> None:
    first, second, after = CASES[name]
    whole = parse(name, [first + second + after], truncated=False)[1]
    for cut in range(len(second)):
        text = first + second[:cut]
        for chunks in ([text], list(text)):
            content, calls, started = parse(name, chunks, truncated=True)
            assert content == "", (name, cut, content)
            assert calls in (whole[:1], whole), (name, cut, calls)
            assert started <= 2
    assert parse(name, [first + second[:-14]], truncated=True)[1] == whole[:1]


@pytest.mark.parametrize("name", ["deepseek_v31", "kimi_k2"])
def test_a_cut_section_close_is_dropped(name: str) -> None:
    first, second, after = CASES[name]
    for cut in range(1, len(after)):
        text = first + second + after[:cut]
        content, calls, _ = parse(name, [text], truncated=True)
        assert content == "" and [c[0] for c in calls] == ["get_time", "get_weather"]


def test_a_model_that_stops_inside_a_call_wrote_content() -> None:
    text = QWEN_1 + QWEN_2[:30]
    content, calls, _ = parse("qwen", [text], truncated=False)
    assert [c[0] for c in calls] == ["get_time"] and content == QWEN_2[:30]


def test_content_before_a_cut_call_stays_and_a_cut_marker_goes() -> None:
    assert parse("qwen", ["Let me check. <tool_call>\n{"], truncated=True) == (
        "Let me check.",
        [],
        0,
    )
    assert parse("qwen", ["Let me check. <tool_"], truncated=True)[0] == "Let me check."
    assert parse("qwen", ["a < b"], truncated=True)[0] == "a < b"  # not a marker's beginning
