"""A real-size-vocabulary bench checkpoint: Qwen3-30B-A3B's per-layer shapes, few layers.

What it builds (``build_real_vocab_checkpoint(out)``, or ``python -m bench.make_checkpoint
--real-vocab OUT``), offline and from fixed seeds:

* a ``qwen3_moe`` config with Qwen3-30B-A3B's per-layer shapes (publisher ``config.json``):
  hidden 2048, 32 query / 4 KV heads of head_dim 128, 128 routed experts with top-8 routing,
  expert width 768, ``norm_topk_prob`` true, rope theta 1e6, untied output head, and Qwen3's
  model vocabulary of 151,936 rows; only ``layers`` decoder layers (default 2: ~1.85 B
  parameters, 3.7 GB in bfloat16, 7.4 GB once loaded as float32);
* random weights, stored **bfloat16** as the publisher stores them (matrices ~ N(0, 1/fan_in),
  norm gains near one); load them with ``--dtype float32`` on a CPU, MLX's fast CPU path;
* a byte-level BPE tokenizer laid out like Qwen3's: 151,643 trained entries (ids 0-151,642;
  Qwen2's pre-tokenizer split pattern followed by byte-level mapping), then the 26 added
  tokens at Qwen3's ids (``<|endoftext|>`` 151,643, ``<|im_start|>`` 151,644, ``<|im_end|>``
  151,645 ... ``<think>`` 151,667, ``</think>`` 151,668): 151,669 tokenizer entries, and the
  embedding padded to 151,936 as in the real model, so padded ids that no text maps to are
  exercised too. The merges are trained (``tokenizers``) on a generated corpus of
  pseudo-words, CJK characters, digits and code punctuation, so the strings have realistic
  lengths and byte mixes; they are **not** Qwen's vocabulary (no real tokenizer file is
  available offline), and the text the model writes is noise. Only speed means anything.

A ``.complete`` marker records a finished build; ``ensure_real_vocab_checkpoint`` reuses it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from moeserve.models.convert import save_weights
from moeserve.models.loader import build_model
from moeserve.server.text.tokenizer import CHATML_TEMPLATE

DEFAULT_REAL_VOCAB_DIR = Path(__file__).parent / "checkpoints" / "qwen3_moe_real_vocab"
MODEL_VOCAB = 151_936  # Qwen3's embedding rows (padded past the tokenizer)
TRAINED_VOCAB = 151_643  # Qwen3's regular (BPE) entries; the added tokens follow
# Qwen3's added tokens in id order from 151,643 (the publisher's tokenizer_config.json);
# the flag says whether it is a special (control) token.
QWEN3_ADDED = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
# Qwen2/Qwen3's pre-tokenizer split (a fact about the format, needed for like tokenisation).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONSONANTS = "b c d f g h j k l m n p r s t v w z st tr pl gr ch sh th".split()
_VOWELS = "a e i o u ai ou ea io y".split()
_PUNCT = "{ } ( ) ); == -> :: \" ', // /* */ ] [ ... != += <= >= </ /> #".split()


def qwen3_a3b_config(layers: int = 2) -> dict[str, Any]:
    """Qwen3-30B-A3B's ``config.json`` with ``layers`` decoder layers.

    Args:
        layers: Decoder layers (the real model has 48).

    Returns:
        The config dictionary.
    """
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "intermediate_size": 6144,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 40960,
        "attention_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": MODEL_VOCAB,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    }


def _corpus(lines: int, seed: int) -> list[str]:
    """Generated text with enough distinct pairs for ~151k merges (about 6 MB)."""
    rng = random.Random(seed)

    def word() -> str:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 5)))
        return w.capitalize() if rng.random() < 0.2 else w

    def piece() -> str:
        r = rng.random()
        if r < 0.7:
            return word()
        if r < 0.8:
            return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 3)))
        if r < 0.9:
            return rng.choice(_PUNCT)
        return str(rng.randint(0, 99999))

    return [" ".join(piece() for _ in range(14)) for _ in range(lines)]


def build_qwen3_like_tokenizer(out: Path, seed: int = 0) -> Path:
    """Train the 151,643-entry byte-level BPE and add Qwen3's 26 added tokens after it.

    Args:
        out: Directory for ``tokenizer.json`` and ``tokenizer_config.json``.
        seed: Corpus seed.

    Returns:
        ``out``.

    Raises:
        RuntimeError: If training fell short of 151,643 entries (too few distinct pairs).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=0,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(60_000, seed), trainer=trainer)
    if tok.get_vocab_size() != TRAINED_VOCAB:
        raise RuntimeError(f"trained {tok.get_vocab_size()} entries, wanted {TRAINED_VOCAB}")
    for content, special in QWEN3_ADDED:  # one at a time: ids follow in this order
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    decoder = {
        str(i): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _init(name: str, shape: tuple[int, ...]) -> mx.array:
    """Activations stay O(1): matrices ~ N(0, 1/fan_in), norm gains near one."""
    if len(shape) == 1:
        return (1.0 if "norm" in name else 0.0) + 0.1 * mx.random.normal(shape)
    return mx.random.normal(shape) * (shape[-1] ** -0.5)


def build_real_vocab_checkpoint(out: Path, layers: int = 2, seed: int = 0) -> Path:
    """Write the checkpoint (config, bfloat16 safetensors, tokenizer) into ``out``.

    Built in ``out.tmp`` and renamed, so a half-written directory is never mistaken for one.

    Args:
        out: Model directory.
        layers: Decoder layers.
        seed: Weight and corpus seed.

    Returns:
        ``out``.
    """
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_qwen3_like_tokenizer(tmp, seed)
    config = qwen3_a3b_config(layers)
    mx.random.seed(seed)
    model, _ = build_model(config)
    # Lazy until saved: each tensor is drawn in float32 and cast on its own, so the peak is
    # the bfloat16 checkpoint plus one float32 tensor rather than the float32 model.
    weights = {
        name: _init(name, v.shape).astype(mx.bfloat16)
        for name, v in tree_flatten(model.parameters())
    }
    del model
    save_weights(tmp, weights)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = {"bos_token_id": 151643, "eos_token_id": [151645, 151643]}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ensure_real_vocab_checkpoint(out: Path = DEFAULT_REAL_VOCAB_DIR, layers: int = 2) -> Path:
    """Build the checkpoint at ``out`` unless a finished one is there.

    Args:
        out: Model directory.
        layers: Decoder layers, when building.

    Returns:
        ``out``.
    """
    if not (out / ".complete").exists():
        build_real_vocab_checkpoint(out, layers)
    return out
