"""Write the benchmark checkpoint: a ~67M-parameter float32 Qwen2-MoE in the MLX layout.

hidden 512, 8 layers, 8 attention heads / 4 KV heads, 16 experts with top-4 routing, expert
width 256, a shared expert of 512, and a byte-level BPE tokenizer of about 4k tokens with a
ChatML template, all from fixed seeds: the same files on every machine, so that moeserve and
mlx_lm.server load identical weights.

Usage: python bench/make_checkpoint.py [OUT_DIR]   (default: bench/checkpoints/qwen2_moe)
       python -m bench.make_checkpoint --real-vocab [OUT_DIR] [--layers N]
           (Qwen3-30B-A3B shapes, 151,936-row vocabulary: bench/real_vocab_checkpoint.py;
           default bench/checkpoints/qwen3_moe_real_vocab)
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from moeserve.devtools.demo import CheckpointSpec, build_checkpoint
from moeserve.devtools.tokenizer_build import DEFAULT_CORPUS

_SYLLABLES = "ka to ri mu se la no vi pe da zu ho gre stan tion ment ing er al ly".split()


def tokenizer_corpus(lines: int = 4000, seed: int = 0) -> tuple[str, ...]:
    """English prose plus seeded pseudo-words: enough distinct pairs for ~4k BPE merges.

    Args:
        lines: Number of generated lines.
        seed: RNG seed.

    Returns:
        The corpus lines.
    """
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    generated = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines)]
    return (DEFAULT_CORPUS, *generated)


BENCH_SPEC = CheckpointSpec(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=512,
    vocab_size=4096,
    max_position_embeddings=8192,
    seed=1234,
    tokenizer_corpus=tokenizer_corpus(),
)

DEFAULT_DIR = Path(__file__).parent / "checkpoints" / "qwen2_moe"


def ensure_checkpoint(path: Path = DEFAULT_DIR) -> Path:
    """Build the bench checkpoint at ``path`` unless a model is already there.

    Args:
        path: Model directory.

    Returns:
        ``path``.
    """
    if not (path / "config.json").exists():
        build_checkpoint(path, BENCH_SPEC)
    return path


def main() -> None:
    """Build the checkpoint at the given (or default) directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=None)
    parser.add_argument(
        "--real-vocab", action="store_true", help="the Qwen3-shaped real-vocabulary checkpoint"
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (--real-vocab)")
    args = parser.parse_args()
    if args.real_vocab:
        from bench.real_vocab_checkpoint import DEFAULT_REAL_VOCAB_DIR, build_real_vocab_checkpoint

        out = args.out or DEFAULT_REAL_VOCAB_DIR
        path = build_real_vocab_checkpoint(out, layers=args.layers)
    else:
        path = build_checkpoint(args.out or DEFAULT_DIR, BENCH_SPEC)
    print(path)


if __name__ == "__main__":
    main()
