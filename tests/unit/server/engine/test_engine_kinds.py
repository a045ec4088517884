"""Every cache kind through the engine: batching and the prompt cache never change an output.

The models are the toys of ``tests/unit/models/cache/toy_models.py`` (sliding windows with
sinks, MLA-like latent, gated-DeltaNet-like recurrent, and mixtures), widened to the demo
tokenizer's vocabulary. For each: requests batched together give what each gives alone
(greedy), and a session's second turn reuses what its kinds allow (any prefix for full and
latent layers, the window for sliding ones, a saved turn boundary for recurrent ones) and
still gives the output of a run without the prompt cache.
"""

from __future__ import annotations

import asyncio
import uuid

import mlx.core as mx
import pytest

from moeserve.devtools.demo import CheckpointSpec, build_checkpoint
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import GenerationRequest
from moeserve.server.engine.prompt_cache import PromptCache, PromptCacheConfig
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.text.tokenizer import Tokenizer
from tests.unit.models.cache.toy_models import TOYS, ToyArgs, ToyModel
from tests.unit.server.engine.test_engine import _collect, _prompts

KINDS = ["sliding", "latent", "recurrent", "hybrid", "mixed"]
GREEDY = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(build_checkpoint(tmp_path_factory.mktemp("demo"), CheckpointSpec()))


def _toy(name: str, vocab: int) -> ToyModel:
    mx.random.seed(1)
    model = ToyModel(ToyArgs(TOYS[name], vocab_size=vocab))
    mx.eval(model.parameters())
    return model


def _engine(model, tokenizer, cache: PromptCache | None = None) -> Engine:
    config = SchedulerConfig(
        max_running=8, max_batched_tokens=48, prefill_chunk=16, max_model_len=512
    )
    engine = Engine(model, tokenizer, config, prompt_cache=cache)
    engine.start()
    return engine


def _request(prompt: list[int], session: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        uuid.uuid4().hex, prompt, SamplingParams(**GREEDY), session_key=session
    )


def _run(engine: Engine, prompt: list[int], session: str | None = None):
    _, ids, finish = asyncio.run(_collect(engine, _request(prompt, session)))
    return ids[0], finish[0].cached_tokens


@pytest.mark.parametrize("kind", KINDS)
def test_batched_outputs_equal_solo_outputs(kind, tokenizer) -> None:
    model = _toy(kind, tokenizer.vocab_size)
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


@pytest.mark.parametrize("kind", KINDS)
def test_second_turn_reuses_what_the_kinds_allow_and_output_is_unchanged(kind, tokenizer) -> None:
    model = _toy(kind, tokenizer.vocab_size)
    first = _prompts(tokenizer)[-1]  # several chunks long: past every toy window
    plain = _engine(model, tokenizer)
    cached = _engine(model, tokenizer, PromptCache(PromptCacheConfig()))
    try:
        reply, _ = _run(cached, first, "s")
        follow = tokenizer.encode(" and then the scheduler runs")
        # Turn 2 continues turn 1 (its prompt and reply); turn 3 rewrites the reply.
        continued = first + reply + follow
        expected = _run(plain, continued)[0]
        got, reused = _run(cached, continued, "s")
        assert got == expected
        # What the runner saved: every position computed, i.e. all of turn 1 but its last token.
        assert reused == len(first) + len(reply) - 1
        rewritten = first + follow
        expected = _run(plain, rewritten)[0]
        got, reused = _run(cached, rewritten, "s")
        assert got == expected
    finally:
        plain.shutdown()
        cached.shutdown()
    if kind in ("sliding", "mixed"):
        assert reused == 0  # the window had moved past the shared prefix
    else:
        # Latent layers reuse any prefix; recurrent ones the end of turn 1's prompt, a
        # boundary turn 2's entry inherited, which is exactly where the turns diverge.
        assert reused == len(first)
