"""Helpers for the format tests: every chunking of a stream, and constrained generation.

A parser must decide the same whatever way its text is cut into chunks, so each stream is
parsed in one piece and in many cuts (every 2-way split, one character at a time, random
multi-splits and optionally every 3-way split) and the results compared.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import DeltaEvent, ErrorEvent, FinishEvent, GenerationRequest
from moeserve.server.engine.grammar import Constraint
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.text.formats import (
    ContentDelta,
    ReasoningDelta,
    ToolCallArgs,
    ToolCallStart,
    ToolFormat,
)
from moeserve.server.text.tokenizer import Tokenizer

Factory = Callable[[], ToolFormat]
Result = tuple[list[tuple], list[tuple[str, str]]]

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},  # no parameters: {}
]
TOOL_SCHEMAS = {"get_weather": WEATHER, "get_time": {"type": "object", "maxProperties": 0}}
SEEDS = range(8)


def normalize(events: list, calls: list) -> Result:
    """Merge adjacent content/reasoning/argument pieces; check ids; return (events, calls)."""
    out: list[tuple] = []
    ids: dict[int, str] = {}
    for event in events:
        if isinstance(event, (ContentDelta, ReasoningDelta)):
            assert event.text
            kind = "content" if isinstance(event, ContentDelta) else "reasoning"
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + event.text)
            else:
                out.append((kind, event.text))
        elif isinstance(event, ToolCallStart):
            assert re.fullmatch(r"call_[0-9a-f]{24}", event.id)
            assert event.index == len(ids)  # indices count up from 0 in stream order
            ids[event.index] = event.id
            out.append(("start", event.index, event.name))
        else:
            assert isinstance(event, ToolCallArgs) and event.text and event.index in ids
            if out and out[-1][:2] == ("args", event.index):
                out[-1] = ("args", event.index, out[-1][2] + event.text)
            else:
                out.append(("args", event.index, event.text))
    assert len({c.id for c in calls}) == len(calls) and {c.id for c in calls} <= set(ids.values())
    return out, [(c.name, c.arguments) for c in calls]


def run(factory: Factory, chunks: Iterable[str]) -> Result:
    parser = factory()
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    return normalize(events + parser.finish(), parser.calls)


def chunkings(text: str, seed: int = 0, pairs: bool = False) -> Iterable[list[str]]:
    """Every 2-way split, one char at a time, random multi-splits (and every 3-way split)."""
    n = len(text)
    for i in range(n + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(seed)
    for _ in range(60 if n > 2 else 0):
        cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(2, 12))))
        yield [text[a:b] for a, b in itertools.pairwise([0, *cuts, n])]
    if pairs:
        for i, j in itertools.combinations(range(1, n), 2):
            yield [text[:i], text[i:j], text[j:]]


def one_shot_equals_every_chunking(factory: Factory, text: str, pairs: bool = False) -> Result:
    expected = run(factory, [text])
    for chunks in chunkings(text, pairs=pairs):
        assert run(factory, chunks) == expected, chunks
    return expected


def content_of(result: Result) -> str:
    return "".join(e[1] for e in result[0] if e[0] == "content")


def generate(
    engine: Engine, tokenizer: Tokenizer, constraint: Constraint | None, seeds: Iterable[int]
) -> list[tuple[str, Any]]:
    """One sampled completion per seed (temperature 1), all in one batch: (text, finish)."""
    prompt = tokenizer.encode("Call a tool:")

    async def one(seed: int) -> tuple[str, Any]:
        params = SamplingParams(temperature=1.0, max_tokens=200, seed=seed)
        request = GenerationRequest(uuid.uuid4().hex, prompt, params, constraint=constraint)
        text, finish = "", None
        async for event in engine.generate(request):
            if isinstance(event, DeltaEvent):
                text += event.text
            elif isinstance(event, FinishEvent):
                finish = event.finish_reason
            elif isinstance(event, ErrorEvent):
                raise AssertionError(event.message)
        return text, finish

    async def together() -> list[tuple[str, Any]]:
        return await asyncio.gather(*(one(s) for s in seeds))

    return asyncio.run(together())


def qwen_calls(text: str) -> list[dict]:
    """The calls of constrained output, read independently of the parser: exact layout."""
    blocks = text.split("\n")
    calls = []
    for i in range(0, len(blocks), 3):
        assert blocks[i : i + 3 : 2] == ["<tool_call>", "</tool_call>"], text
        calls.append(json.loads(blocks[i + 1]))
    assert len(blocks) % 3 == 0, text
    return calls
