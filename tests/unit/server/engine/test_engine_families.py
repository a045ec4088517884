"""Isolation for every architecture: through the engine, batched greedy output equals solo.

Each registered model type's committed fixture (``tests/fixtures/models/<type>_a/hf``, in
float32) runs requests of different lengths one at a time, then joined at different steps;
every request must produce exactly its solo tokens, whatever its cache kinds (full,
sliding, latent, recurrent). The demo tokenizer stands in (the fixtures' ids are below its
vocabulary), so only token ids are compared.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from moeserve.devtools.demo import CheckpointSpec, build_checkpoint
from moeserve.models import load_model
from moeserve.models.registry import registered_model_types
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.text.tokenizer import Tokenizer
from tests.helpers import FIXTURES
from tests.unit.server.engine.test_engine import _collect, _request

GREEDY = {"temperature": 0.0, "max_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(build_checkpoint(tmp_path_factory.mktemp("demo"), CheckpointSpec()))


@pytest.mark.parametrize("model_type", registered_model_types())
def test_batched_greedy_output_equals_solo(model_type, tokenizer) -> None:
    model, config = load_model(FIXTURES / f"{model_type}_a" / "hf", dtype="float32")
    text = config.get("text_config") or config  # multimodal configs nest the text model's
    vocab = min(text["vocab_size"], tokenizer.vocab_size)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, vocab, n).tolist() for n in (5, 13, 21, 34)]
    config = SchedulerConfig(
        max_running=8, max_batched_tokens=32, prefill_chunk=8, max_model_len=128
    )
    engine = Engine(model, tokenizer, config)
    engine.start()
    try:
        solo = [asyncio.run(_collect(engine, _request(p, **GREEDY)))[1][0] for p in prompts]

        async def together():
            jobs = [_collect(engine, _request(p, **GREEDY), 2 * i) for i, p in enumerate(prompts)]
            return await asyncio.gather(*jobs)

        batched = [r[1][0] for r in asyncio.run(together())]
    finally:
        engine.shutdown()
    assert engine.runner.max_batch_seen >= 3, "the requests did not overlap"
    assert all(len(s) == GREEDY["max_tokens"] for s in solo)
    assert batched == solo
