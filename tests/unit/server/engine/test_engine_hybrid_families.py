"""Qwen3-Next and Qwen3.5-MoE (gated DeltaNet + full attention) through the engine.

``test_engine_kinds.py`` runs the toy recurrent layers; these are the real hybrid families'
tiny models (``tests/unit/models/helpers.py``, DeltaNet decays slowed so that the state
carries), widened to the demo tokenizer's vocabulary. Requests batched together give what
each gives alone (greedy), and a session's next turn reuses the saved recurrent boundary and
still gives the output of a run without the prompt cache.
"""

from __future__ import annotations

import asyncio

import pytest

from moeserve.devtools.demo import CheckpointSpec, build_checkpoint
from moeserve.server.engine.prompt_cache import PromptCache, PromptCacheConfig
from moeserve.server.text.tokenizer import Tokenizer
from tests.unit.models.helpers import QWEN3_5_MOE, QWEN3_NEXT, Family
from tests.unit.models.test_gated_delta import slow
from tests.unit.server.engine.test_engine import _collect, _prompts
from tests.unit.server.engine.test_engine_kinds import _engine, _request, _run

each_family = pytest.mark.parametrize("family", [QWEN3_NEXT, QWEN3_5_MOE], ids=lambda f: f.name)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(build_checkpoint(tmp_path_factory.mktemp("demo"), CheckpointSpec()))


def _model(family: Family, vocab: int):
    model = family.model(vocab_size=vocab)
    for i, layer in enumerate(model.layers):
        if "linear_attn" in layer:
            slow(layer.linear_attn, seed=i)
    return model


@each_family
def test_batched_outputs_equal_solo_outputs(family: Family, tokenizer: Tokenizer) -> None:
    model = _model(family, tokenizer.vocab_size)
    prompts = _prompts(tokenizer)[:5]
    engine = _engine(model, tokenizer)
    try:
        solo = [_run(engine, p)[0] for p in prompts]

        async def together():
            jobs = [_collect(engine, _request(p), 2 * i) for i, p in enumerate(prompts)]
            return await asyncio.gather(*jobs)

        batched = [r[1][0] for r in asyncio.run(together())]
    finally:
        engine.shutdown()
    assert engine.runner.max_batch_seen >= 3, "the requests did not overlap"
    assert batched == solo


@each_family
def test_next_turn_reuses_the_recurrent_boundary(family: Family, tokenizer: Tokenizer) -> None:
    model = _model(family, tokenizer.vocab_size)
    first = _prompts(tokenizer)[-1]  # several prefill chunks long
    plain = _engine(model, tokenizer)
    cached = _engine(model, tokenizer, PromptCache(PromptCacheConfig()))
    try:
        reply, _ = _run(cached, first, "s")
        follow = tokenizer.encode(" and then the scheduler runs")
        continued = first + reply + follow
        got, reused = _run(cached, continued, "s")
        assert got == _run(plain, continued)[0]
        assert reused == len(first) + len(reply) - 1  # every position turn 1 computed
        rewritten = first + follow  # diverges at the end of turn 1's prompt: a boundary
        got, reused = _run(cached, rewritten, "s")
        assert got == _run(plain, rewritten)[0]
        assert reused == len(first)
    finally:
        plain.shutdown()
        cached.shutdown()
