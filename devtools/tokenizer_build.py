"""Train tiny, deterministic tokenizers for tests, the demo model and benchmarks.

Two kinds, both written in Hugging Face layout (`tokenizer.json` + `tokenizer_config.json`) so
that `Tokenizer.from_dir` (and `transformers.AutoTokenizer`) load them:

- byte-level BPE, the GPT-2 / Qwen kind, with ChatML special tokens and template;
- SentencePiece-style BPE, the Llama kind: `▁` marks spaces, characters outside the vocabulary
  fall back to `<0xNN>` byte tokens, and the decoder strips the first leading space.

Training uses the `tokenizers` trainers on a small built-in English text (or a given corpus),
takes well under two seconds, and the same inputs always give byte-identical files. These
tokenizers know nothing of any real model's vocabulary; they exist to exercise the code paths.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from moeserve.server.text.tokenizer import CHATML_TEMPLATE

CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))

# Written for this project: plain prose about serving language models, with the punctuation,
# digits and casing a tokenizer should see. Deterministic and small (about 3 KB).
DEFAULT_CORPUS = """\
A language model reads text as a sequence of tokens. Each token is a number, and the model
predicts the next number from the ones before it. The server turns a request into tokens,
runs the model one step at a time, and turns the new tokens back into text for the client.
Many clients share one model. While one request is still reading its prompt, another is
already writing its answer, and the scheduler decides who runs in the next step. A request
that waits too long is not forgotten; it moves to the front of the queue when its turn comes.
Mixture-of-experts models route every token to a few experts out of many. A router scores the
experts, keeps the best two or four or eight, and mixes their outputs with the router weights.
Only the chosen experts do any work, so a model with sixty experts costs little more per token
than a small dense model, while it knows much more.
The cache remembers what the model has already read. When a user sends the next turn of a
conversation, the server finds the longest prefix it has seen before and computes only the
rest. This saves time: a long system prompt is read once and reused for every later turn.
Stop strings end an answer early. If the client asks the server to stop at a blank line, the
text before it is sent and the blank line itself is never shown. Some stop strings span two
or three tokens, so the server keeps a few characters back until it knows what they become.
Numbers matter too: 1, 2, 3, 10, 42, 100, 256, 1024, 2048 and 65536 appear in prompts, in
code and in answers. So do dates like 2024-05-17, times like 09:30, and prices like $12.50.
Code looks different from prose. def main(): return 0 if ok else 1. for i in range(10):
print(i). {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. How much
wood would a woodchuck chuck if a woodchuck could chuck wood? Peter Piper picked a peck of
pickled peppers. A journey of a thousand miles begins with a single step.
When the model is unsure, sampling chooses among likely tokens. Temperature makes the choice
bolder or safer, top-p keeps the smallest set of tokens whose probabilities add up to p, and
top-k keeps only the k most likely ones. A seed makes the choice repeatable for tests.
Questions and answers, lists and tables, letters and poems: the same machinery serves them
all. Be clear, be brief, and check your work. Thank you for reading; have a good day!
"""


def _write_files(out_dir: Path, tokenizer: Tokenizer, config: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    # Pretty-printed by `tokenizers` itself; key order is fixed, so the bytes are deterministic.
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return out_dir


def _added_tokens_decoder(tokenizer: Tokenizer) -> dict[str, dict[str, Any]]:
    # The `added_tokens_decoder` entry transformers expects in tokenizer_config.json.
    return {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }


def _check_vocab_size(vocab_size: int, minimum: int) -> None:
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum}, got {vocab_size}")


def build_bpe_tokenizer(
    out_dir: Path,
    *,
    vocab_size: int = 512,
    corpus: Iterable[str] | None = None,
    chat_template: str | None = None,
    added_tokens: Sequence[str] = (),
) -> Path:
    """Train a byte-level BPE tokenizer with ChatML special tokens.

    Ids 0-2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`; then the 256 byte symbols, so
    any text encodes; then the merges. EOS is `<|im_end|>`, padding `<|endoftext|>`, no BOS.

    Args:
        out_dir: Directory to write `tokenizer.json` and `tokenizer_config.json` into.
        vocab_size: Vocabulary size including special and byte tokens (at least 259).
        corpus: Training texts; defaults to `DEFAULT_CORPUS`.
        chat_template: Template for `tokenizer_config.json`; defaults to `CHATML_TEMPLATE`.
        added_tokens: Extra non-special tokens (e.g. `<think>`) appended after training.

    Returns:
        `out_dir`.
    """
    _check_vocab_size(vocab_size, len(CHATML_SPECIAL_TOKENS) + 256)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus or [DEFAULT_CORPUS]), trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer),
        "chat_template": chat_template if chat_template is not None else CHATML_TEMPLATE,
    }
    return _write_files(out_dir, tokenizer, config)


def _train_metaspace_bpe(vocab_size: int, corpus: list[str]) -> tuple[dict[str, int], list]:
    """Train the merges of a `▁`-marked BPE; returns (vocabulary, merges)."""
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    trainer_tokenizer.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return trained["vocab"], merges


def build_sentencepiece_style_tokenizer(
    out_dir: Path,
    *,
    vocab_size: int = 512,
    corpus: Iterable[str] | None = None,
    chat_template: str | None = None,
    added_tokens: Sequence[str] = (),
) -> Path:
    """Train a Llama-style tokenizer: `▁` spaces, byte fallback, BOS added on request.

    Ids 0-2 are `<unk>`, `<s>`, `</s>`, ids 3-258 the byte tokens `<0x00>`-`<0xFF>` (as in
    Llama), then the trained pieces. Any character the corpus lacks encodes as UTF-8 bytes.

    Args:
        out_dir: Directory to write `tokenizer.json` and `tokenizer_config.json` into.
        vocab_size: Vocabulary size including special and byte tokens (at least 300).
        corpus: Training texts; defaults to `DEFAULT_CORPUS`.
        chat_template: Template for `tokenizer_config.json`; none is written when omitted.
        added_tokens: Extra non-special tokens appended after training.

    Returns:
        `out_dir`.
    """
    fixed = (*LLAMA_SPECIAL_TOKENS, *_BYTE_TOKENS)
    _check_vocab_size(vocab_size, len(fixed) + 41)
    trained_vocab, merges = _train_metaspace_bpe(
        vocab_size - len(fixed), list(corpus or [DEFAULT_CORPUS])
    )
    vocab = {token: i for i, token in enumerate(fixed)}
    for token in sorted(trained_vocab, key=trained_vocab.__getitem__):
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in LLAMA_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer),
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return _write_files(out_dir, tokenizer, config)
