"""The tiny demo model (random weights) and a running Engine, for constrained generation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moeserve.devtools.demo import CheckpointSpec, build_checkpoint
from moeserve.models import load
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def demo_tokenizer_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object]:
    path = build_checkpoint(tmp_path_factory.mktemp("formats-demo"), CheckpointSpec(seed=3))
    return Tokenizer.from_dir(path), load(path).model


@pytest.fixture(scope="session")
def tokenizer(demo_tokenizer_and_model: tuple[Tokenizer, object]) -> Tokenizer:
    return demo_tokenizer_and_model[0]


@pytest.fixture(scope="session")
def engine(demo_tokenizer_and_model: tuple[Tokenizer, object]) -> Iterator[Engine]:
    tokenizer, model = demo_tokenizer_and_model
    config = SchedulerConfig(max_running=16, max_batched_tokens=128, prefill_chunk=32)
    engine = Engine(model, tokenizer, config)
    engine.start()
    yield engine
    engine.shutdown()
