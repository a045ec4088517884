"""Shared unit-test fixtures: tiny tokenizers trained once per session into temporary dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from moeserve.devtools.tokenizer_build import (
    DEFAULT_CORPUS,
    build_bpe_tokenizer,
    build_sentencepiece_style_tokenizer,
)
from moeserve.models import backend
from moeserve.server.text.tokenizer import Tokenizer

# Non-special added tokens, like Qwen3's reasoning markers: decoded as text, never skipped.
THINK_TOKENS = ("<think>", "</think>")

# Repeated CJK and emoji make the BPE merge bytes across character boundaries, so that some
# tokens hold a whole character plus the first bytes of the next one.
MULTIBYTE_CORPUS = (
    DEFAULT_CORPUS,
    "你好世界，模型在服务器上运行。你好你好世界世界 " * 3,
    "🙂🚀👍🏽 emoji 🙂🙂 café naïve résumé " * 3,
)


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe"), added_tokens=THINK_TOKENS)


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sentencepiece_style_tokenizer(
        tmp_path_factory.mktemp("sp"), added_tokens=THINK_TOKENS
    )


@pytest.fixture(scope="session")
def multibyte_bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bpe_tokenizer(
        tmp_path_factory.mktemp("bpe_multibyte"), vocab_size=600, corpus=MULTIBYTE_CORPUS
    )


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(bpe_dir)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(sp_dir)


@pytest.fixture(scope="session")
def multibyte_bpe_tokenizer(multibyte_bpe_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(multibyte_bpe_dir)


@pytest.fixture(scope="session", params=["bpe", "sp", "multibyte_bpe"])
def any_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.fixture
def fastmath_state() -> Iterator[None]:
    """Put the CPU backend's fast-math switch (``cpu_fast_math``) back as it was after the test."""
    saved = backend.set_fast_math(True)  # each test starts from the default
    yield
    backend.set_fast_math(saved)
