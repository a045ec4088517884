"""Grammar-constrained decoding on the real tiny demo model (random weights) and the real Engine.

The demo model's text is noise, so whatever structure its constrained output has comes from
the grammar: the same requests without the constraint are checked to be invalid JSON. Each
tool-call format's grammar is tested with the format, in tests/unit/server/text/formats.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from moeserve.devtools.demo import CheckpointSpec, build_checkpoint
from moeserve.models import load
from moeserve.server.engine import grammar_mask
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import DeltaEvent, ErrorEvent, FinishEvent, GenerationRequest
from moeserve.server.engine.grammar import Constraint, GrammarCompiler, GrammarError
from moeserve.server.engine.grammar_mask import allowed_mask
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.text.formats.glm45 import Glm45Format
from moeserve.server.text.formats.qwen import QwenFormat
from moeserve.server.text.tokenizer import Tokenizer
from tests.helpers import validate
from tests.unit.server.text.formats.helpers import TOOLS, qwen_calls

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"k": {"type": "string", "maxLength": 8}, "v": {"type": "integer"}},
                "required": ["k", "v"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}

SEEDS = range(8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[object, Tokenizer, Path]:
    path = build_checkpoint(tmp_path_factory.mktemp("demo"), CheckpointSpec(seed=3))
    return load(path).model, Tokenizer.from_dir(path), path


@pytest.fixture(scope="module")
def engine(demo):
    model, tokenizer, _ = demo
    config = SchedulerConfig(max_running=16, max_batched_tokens=128, prefill_chunk=32)
    engine = Engine(model, tokenizer, config)
    engine.start()
    yield engine
    engine.shutdown()


async def _collect(engine: Engine, request: GenerationRequest):
    text, finish = [""] * request.n, [None] * request.n
    async for event in engine.generate(request):
        if isinstance(event, DeltaEvent):
            text[event.index] += event.text
        elif isinstance(event, FinishEvent):
            finish[event.index] = event.finish_reason
        elif isinstance(event, ErrorEvent):
            return event.message, None
    return text, finish


def _run(engine: Engine, requests: list[GenerationRequest]) -> list[tuple]:
    async def together():
        return await asyncio.gather(*(_collect(engine, r) for r in requests))

    return asyncio.run(together())


def _request(tokenizer: Tokenizer, constraint: Constraint | None, **params) -> GenerationRequest:
    prompt = tokenizer.encode("Answer with a JSON record of one user:")
    n = params.pop("n", 1)
    params = {"temperature": 1.0, "max_tokens": 200, **params}
    params = SamplingParams(**params)
    return GenerationRequest(uuid.uuid4().hex, prompt, params, n=n, constraint=constraint)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_json_schema_constraint_is_what_makes_output_valid(engine, demo) -> None:
    tokenizer = demo[1]
    constraint = engine.grammar.json_schema(SCHEMA)
    constrained = _run(engine, [_request(tokenizer, constraint, seed=s) for s in SEEDS])
    free = _run(engine, [_request(tokenizer, None, seed=s) for s in SEEDS])
    for (text,), (finish,) in constrained:
        assert finish == "stop", text
        validate(json.loads(text), SCHEMA)
    assert sum(not _parses(text) for (text,), _ in free) >= 6, free


def test_json_object_and_n_choices(engine, demo) -> None:
    tokenizer = demo[1]
    results = _run(
        engine, [_request(tokenizer, engine.grammar.json_object(), n=2, seed=s) for s in SEEDS]
    )
    stopped = 0
    for texts, finishes in results:
        for text, finish in zip(texts, finishes):
            if finish == "stop":  # a long object may hit max_tokens; what ends must parse
                assert isinstance(json.loads(text), dict), text
                stopped += 1
            else:
                assert text.startswith("{")
    assert stopped >= len(SEEDS), results
    # Both choices of a schema request are valid, and they are not copies of each other.
    (a, b), finishes = _run(
        engine, [_request(tokenizer, engine.grammar.json_schema(SCHEMA), n=2, seed=1)]
    )[0]
    assert finishes == ["stop", "stop"] and a != b
    validate(json.loads(a), SCHEMA)
    validate(json.loads(b), SCHEMA)


def test_allowed_mask_matches_the_grammar_and_pads_the_vocabulary(demo) -> None:
    compiler = GrammarCompiler(demo[1])
    matcher = compiler.matcher(
        compiler.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    )
    for token in demo[1].encode('{"a": 1'):
        assert matcher.consume(token)
    assert allowed_mask([None, None], 600) is None
    V = matcher.vocab_size
    mask = np.array(allowed_mask([None, matcher, None], V + 40))
    assert mask.shape == (3, V + 40) and mask[0].all() and mask[2].all()
    # Independently: ask llguidance token by token which ids may come next.
    expected = [matcher.inner.validate_tokens([t]) == 1 for t in range(V)]
    assert mask[1, :V].tolist() == expected and not mask[1, V:].any()
    assert 0 < sum(expected) < V
    # Inside a JSON string almost any text may follow, but never a special token (EOS, ChatML).
    in_string = compiler.matcher(compiler.json_schema({"type": "string"}))
    assert all(in_string.consume(t) for t in demo[1].encode('"ab'))
    opened = np.array(allowed_mask([in_string], V))[0]
    assert opened.sum() > V // 2 and not opened[sorted(demo[1].special_token_ids)].any()


def test_a_grammar_needing_ids_past_the_embedding_fails_with_the_cause(demo) -> None:
    """A model narrower than its tokenizer: a row that allows only ids it has no row for."""
    compiler = GrammarCompiler(demo[1])
    probe = compiler.matcher(compiler.json_object())
    first = int(np.flatnonzero(np.array(allowed_mask([probe], probe.vocab_size))[0])[0])
    assert first > 0  # the lowest id that may open a JSON object
    fits, narrow = (compiler.matcher(compiler.json_object()) for _ in range(2))
    assert np.array(allowed_mask([fits], first + 1))[0, first] and fits.error is None
    mask = np.array(allowed_mask([narrow, None], first))  # every allowed id is past the table
    assert mask.shape == (2, first) and mask.all()  # left open; the engine fails the row
    assert narrow.error is not None and "no embedding row" in narrow.error
    assert f"it has {first}, the tokenizer {narrow.vocab_size}" in narrow.error
    assert not narrow.consume(0)  # what the engine then checks: the request fails


def test_prebuild_builds_the_tokenizer_off_the_request_path(demo) -> None:
    compiler = GrammarCompiler(demo[1])
    compiler.prebuild().join(timeout=60)
    built = compiler._ll_tokenizer
    assert built is not None and compiler.ll_tokenizer is built  # built once, then reused


def test_a_native_mask_failure_fails_only_its_row(demo, monkeypatch) -> None:
    compiler = GrammarCompiler(demo[1])
    good, bad = (compiler.matcher(compiler.json_object()) for _ in range(2))
    real = grammar_mask._executor()

    class Flaky:
        def unsafe_compute_mask_ptr(self, jobs, *args):
            if any(inner is bad.inner for inner, _ in jobs):
                raise RuntimeError("boom\nnative details")
            return real.unsafe_compute_mask_ptr(jobs, *args)

    monkeypatch.setattr(grammar_mask, "_executor", Flaky)
    V = good.vocab_size
    mask = np.array(allowed_mask([good, None, bad], V))
    assert bad.error == "json_object constraint failed: boom" and good.error is None
    assert mask[0].tolist() == [good.inner.validate_tokens([t]) == 1 for t in range(V)]
    assert mask[1].all() and mask[2].all()  # the failed row is left open; the engine fails it
    assert allowed_mask([None, bad], V) is None  # a failed matcher is no longer consulted


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "strin"}, "strin"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ({"$ref": "#/$defs/missing"}, "/$defs/missing"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum"),
        ("not a schema", "must be an object"),
    ],
)
def test_schemas_llguidance_cannot_compile_raise_grammar_error(demo, schema, needle) -> None:
    with pytest.raises(GrammarError, match=re.escape(needle)):
        GrammarCompiler(demo[1]).json_schema(schema)


def test_an_uncompilable_constraint_is_refused_at_admission(engine, demo) -> None:
    request = _request(demo[1], Constraint('start: "x" undefined_rule', "json_schema"))
    with pytest.raises(GrammarError, match="undefined_rule"):
        asyncio.run(engine.submit(request))
    assert engine.healthy


def test_tool_call_errors_name_the_problem(demo) -> None:
    compiler = GrammarCompiler(demo[1])
    with pytest.raises(GrammarError, match="'nope' is not among"):
        compiler.tool_calls(TOOLS, ["nope"], QwenFormat, False)
    params = {"type": "object", "properties": {"n": {"type": "bogus"}}}
    bad = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    with pytest.raises(GrammarError, match=r"function 'f'.*bogus"):
        compiler.tool_calls(bad, ["f"], Glm45Format, False)


def test_unconstrained_rows_are_unchanged_by_constrained_neighbours(demo) -> None:
    model, tokenizer, _ = demo
    config = SchedulerConfig(max_running=16, max_batched_tokens=128, prefill_chunk=32)
    engine = Engine(model, tokenizer, config)
    engine.start()
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [tokenizer.encode(t) for t in ["the model", "a token and the scheduler", "who runs"]]

    def plain(prompt: list[int]) -> GenerationRequest:
        return GenerationRequest(uuid.uuid4().hex, prompt, greedy)

    try:
        solo = [_run(engine, [plain(p)])[0][0] for p in prompts]
        assert engine.runner.max_batch_seen == 1
        schema = engine.grammar.json_schema(SCHEMA)
        constrained = [_request(tokenizer, schema, seed=s) for s in range(4)]
        mixed = _run(engine, [plain(p) for p in prompts] + constrained)
    finally:
        engine.shutdown()
    assert engine.runner.max_batch_seen == 7, "the requests did not share a batch"
    assert [m[0] for m in mixed[:3]] == solo and all(len(text) for (text,) in solo)
    for (text,), _ in mixed[3:]:
        validate(json.loads(text), SCHEMA)


def test_grammar_wins_over_min_tokens_and_ignore_eos(engine, demo) -> None:
    # With parallel calls EOS competes with "\n" after each call, so a ban on EOS or a
    # continuation past it would change the output; the grammar alone must decide.
    tokenizer = demo[1]
    constraint = engine.grammar.tool_calls(TOOLS, ["get_weather", "get_time"], QwenFormat, True)
    plain = _run(engine, [_request(tokenizer, constraint, seed=s) for s in SEEDS])
    pushy = [
        _request(tokenizer, constraint, seed=s, min_tokens=150, ignore_eos=True) for s in SEEDS
    ]
    assert _run(engine, pushy) == plain
    assert all(finish == ["stop"] for _, finish in plain)
    assert min(len(qwen_calls(text)) for (text,), _ in plain) < 4  # EOS was chosen early


def test_a_failing_matcher_fails_only_its_request(engine, demo, monkeypatch) -> None:
    tokenizer = demo[1]
    real = engine.grammar.matcher

    def failing_on_third_token(constraint):
        matcher, count = real(constraint), [0]
        consume = matcher.consume

        def consume_or_fail(token: int) -> bool:
            count[0] += 1
            if count[0] == 3:
                matcher.error = "json_object constraint failed: injected"
                return False
            return consume(token)

        matcher.consume = consume_or_fail
        return matcher

    monkeypatch.setattr(engine.grammar, "matcher", failing_on_third_token)
    bad = _request(tokenizer, engine.grammar.json_object(), n=2, seed=0)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    good = GenerationRequest(uuid.uuid4().hex, tokenizer.encode("hello"), params)
    (message, finish), (_, good_finish) = _run(engine, [bad, good])
    assert finish is None and message == "json_object constraint failed: injected"
    assert good_finish == ["length"] and engine.healthy
