"""The context-length check (``server/http/context_length.py``).

The token check refuses exactly what does not fit, in OpenAI's wording for either endpoint,
and the engine's own refusal reads the same. The byte bound that refuses a hopeless prompt
before tokenising it must be sound: whatever it refuses really is more than ``max_model_len``
tokens, for byte-level BPE, SentencePiece-style and multi-byte tokenizers and for normalizers
that shrink text; where a tokenizer allows no such bound (a normalizer that can delete text)
it refuses nothing.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from tokenizers import normalizers

from moeserve.server.engine.scheduler import ContextLengthError
from moeserve.server.http.context_length import (
    check_prompt_bytes,
    completion_limit,
    from_engine,
    prompt_byte_limit,
)
from moeserve.server.http.errors import APIError
from moeserve.server.text.tokenizer import Tokenizer

PIECES = ["hello", " world", "你好", "🙂", "é", "\n", "  ", "token", "<think>", "x" * 7]


def _runtime(tokenizer: Tokenizer, max_model_len: int) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=tokenizer, max_model_len=max_model_len, extra={})


def _refused(runtime: SimpleNamespace, text: str) -> bool:
    try:
        check_prompt_bytes(runtime, text)
    except APIError as e:
        assert e.status == 400 and e.code == "context_length_exceeded"
        assert e.param == "messages"
        return True
    return False


def test_refuses_only_what_cannot_fit(any_tokenizer: Tokenizer) -> None:
    runtime = _runtime(any_tokenizer, max_model_len=6)
    rng = random.Random(0)
    refused = 0
    for _ in range(400):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60)))
        if _refused(runtime, text):
            refused += 1
            assert len(any_tokenizer.encode(text)) > runtime.max_model_len, text
    assert refused > 50  # the bound is not vacuous


def test_the_limit_is_the_context_times_the_longest_token(bpe_tokenizer: Tokenizer) -> None:
    runtime = _runtime(bpe_tokenizer, max_model_len=100)
    longest = max(len(bpe_tokenizer.token_bytes(i)) for i in range(bpe_tokenizer.vocab_size))
    limit = prompt_byte_limit(runtime)
    assert limit == 100 * max(longest, 4)
    assert not _refused(runtime, "a" * limit)
    assert _refused(runtime, "a" * (limit + 1))
    assert _refused(runtime, "é" * (limit // 2 + 1))  # counted in UTF-8 bytes, not characters


def test_a_shrinking_normalizer_widens_the_bound(bpe_dir) -> None:
    tokenizer = Tokenizer.from_dir(bpe_dir)
    plain = prompt_byte_limit(_runtime(tokenizer, 10))
    tokenizer.backend.normalizer = normalizers.NFKC()
    runtime = _runtime(tokenizer, 10)
    assert prompt_byte_limit(runtime) == 4 * plain
    # MATHEMATICAL BOLD CAPITAL A: 4 bytes that NFKC turns into one "A".
    text = "\U0001d400" * (plain // 4 + 1)
    assert not _refused(runtime, text)  # over the plain bound, yet it may well fit


@pytest.mark.parametrize(
    "normalizer",
    [normalizers.Strip(), normalizers.Sequence([normalizers.NFC(), normalizers.StripAccents()])],
)
def test_a_normalizer_that_deletes_text_disables_the_bound(bpe_dir, normalizer) -> None:
    tokenizer = Tokenizer.from_dir(bpe_dir)
    tokenizer.backend.normalizer = normalizer
    runtime = _runtime(tokenizer, 1)
    assert prompt_byte_limit(runtime) is None
    assert not _refused(runtime, " " * 100_000)


def _token_runtime(max_model_len: int, default_max_tokens: int) -> SimpleNamespace:
    settings = SimpleNamespace(default_max_tokens=default_max_tokens)
    return SimpleNamespace(max_model_len=max_model_len, settings=settings, kv_budget=None)


def test_a_requested_limit_is_kept_when_it_fits_and_refused_when_not() -> None:
    runtime = _token_runtime(max_model_len=100, default_max_tokens=16)
    assert completion_limit(runtime, 90, 10) == 10  # exactly the room left
    with pytest.raises(APIError) as refused:
        completion_limit(runtime, 90, 11, param="prompt")
    e = refused.value
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "prompt")
    assert "you requested 101 tokens (90 in your prompt, 11 in the completion)" in e.message
    assert "reduce the length of your prompt or completion" in e.message


def test_without_a_limit_the_default_is_cut_to_the_room_left() -> None:
    runtime = _token_runtime(max_model_len=100, default_max_tokens=16)
    assert completion_limit(runtime, 10, None) == 16
    assert completion_limit(runtime, 95, None) == 5
    with pytest.raises(APIError) as refused:
        completion_limit(runtime, 100, None)  # no room for even one token
    assert refused.value.param == "messages"
    assert "(100 in the messages, 1 in the completion)" in refused.value.message


def test_the_engines_refusal_reads_as_the_routes_own() -> None:
    runtime = _token_runtime(max_model_len=100, default_max_tokens=16)
    for param in ("messages", "prompt"):
        with pytest.raises(APIError) as ours:
            completion_limit(runtime, 90, 20, param=param)
        engines = from_engine(ContextLengthError(90, 20, 100), param)
        assert engines.body() == ours.value.body()
