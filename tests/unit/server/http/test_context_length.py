"""The byte bound that refuses a hopeless prompt before tokenising it (``api/common.py``).

It must be sound: whatever it refuses really is more than ``max_model_len`` tokens, for
byte-level BPE, SentencePiece-style and multi-byte tokenizers and for normalizers that shrink
text; where a tokenizer allows no such bound (a normalizer that can delete text) it refuses
nothing.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from tokenizers import normalizers

from server.http.errors import APIError
from server.http.routes.common import check_prompt_bytes, prompt_byte_limit
from server.text.tokenizer import Tokenizer

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
