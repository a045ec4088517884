"""Mixtral (Mixtral-8x7B, Mixtral-8x22B): Mistral's sparse Mixture-of-Experts decoder.

A pre-norm decoder-only transformer with grouped-query attention and rotary embeddings, in
which every layer's feed-forward block is replaced by E (8) SwiGLU experts and a linear
router; each token goes to its top k (2) experts. The router follows the paper's formula
``softmax(top_k(x W_g))``: keep the k largest router logits and softmax over just those
(``topk_softmax``), so the k weights sum to one. That equals transformers' softmax over all
E, top k, then renormalise: the common factor ``sum_e exp(l_e)`` cancels. There is no shared
expert and no dense layer. Source: Jiang et al., "Mixtral of Experts" (arXiv:2401.04088),
section 2.1.

``sliding_window``: the released configs set it to null (Mixtral attends to its full 32k
context). A config that sets it smaller than ``max_position_embeddings`` gets Mistral-7B's
sliding-window attention, as transformers applies it: each query sees the last
``sliding_window`` positions, its own included, and the layer declares a ``Sliding`` cache
that keeps only those.

Checkpoint layouts: the publisher stores ``block_sparse_moe.gate`` and one tensor per expert,
``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up) and ``w2`` (down); the MLX layout
(mlx-lm / mlx-community) stacks them into ``block_sparse_moe.switch_mlp.{gate,up,down}_proj``.
Both load, float or quantized.

This file does not do: training-only pieces (``router_jitter_noise``, the auxiliary
load-balancing loss), Mistral's own ``consolidated.safetensors`` naming, or transformers 5's
fused ``mlp.experts.gate_up_proj`` tensors.

Shape legend: T = B*L flattened tokens, M = hidden size, E = experts, A = experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack
from moeserve.models.layers.attention import Attention, AttentionConfig, gqa_config
from moeserve.models.layers.decoder import LayerNames, PreNormDecoderLayer
from moeserve.models.layers.moe import SwitchGLU, combine_experts, topk_softmax
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.sanitize import drop_prefixes, stack_experts

# The publisher's expert projections under the names SwitchGLU stacks them as.
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass
class ModelArgs(BaseModelArgs):
    """Mixtral configuration (``config.json``); defaults are transformers' ``MixtralConfig``."""

    hidden_size: int  # M, the residual stream width
    num_hidden_layers: int  # decoder layers
    intermediate_size: int  # hidden width of each expert
    num_attention_heads: int  # query heads
    num_local_experts: int  # E, experts per layer
    vocab_size: int  # V
    model_type: str = "mixtral"  # registry key
    num_experts_per_tok: int = 2  # A, experts each token is sent to (top-k)
    num_key_value_heads: int = 8  # key/value heads (GQA); transformers' default is 8
    head_dim: int | None = None  # per-head width; None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    hidden_act: str = "silu"  # expert activation; only SwiGLU (silu) exists in this family
    sliding_window: int | None = None  # attend to the last N positions; None = all
    max_position_embeddings: int = 4096 * 32  # trained context; a window >= it is no window
    tie_word_embeddings: bool = False  # output projection reuses the embedding (never, so far)
    rope_theta: float = 1e6  # rotary base (transformers' Mixtral default is 1e6, not 1e4)
    rope_scaling: dict[str, Any] | None = None  # rotary scaling (pre-transformers-5 spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers 5's rotary settings (wins)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"1..{self.num_local_experts}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")

    @property
    def attention_window(self) -> int | None:
        """The sliding window attention uses, or None when every position is seen.

        A window no shorter than the trained context never cuts anything off, so such a
        layer keeps a full cache (and the prompt cache reuses any prefix of it).
        """
        w = self.sliding_window
        return w if w is not None and w < self.max_position_embeddings else None


def _attention_config(args: ModelArgs) -> AttentionConfig:
    """Mixtral's attention: GQA without biases, full rotary, optionally a sliding window."""
    return gqa_config(args, sliding_window=args.attention_window)


class SparseMoeBlock(nn.Module):
    """Top-k-then-softmax routing over E SwiGLU experts, in every layer.

    For each token x (shapes in the legend above):

    1. Router: ``gate(x)`` gives one logit per expert ``[T, E]``; the k largest are kept
       and a softmax over those k gives the mixing weights ``[T, A]`` (``topk_softmax``).
    2. Each selected expert (``w2(silu(w1 x) * w3 x)``) runs on the token; the outputs are
       summed with the weights ``[T, M]``.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        M, E = args.hidden_size, args.num_local_experts
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(M, E, bias=False)
        self.switch_mlp = SwitchGLU(M, args.intermediate_size, E)

    def __call__(self, x: mx.array) -> mx.array:
        """Apply the block to flattened tokens.

        Args:
            x: ``[T, M]``.

        Returns:
            ``[T, M]``.
        """
        inds, weights = topk_softmax(self.gate(x), self.top_k)  # [T, A], [T, A]
        return combine_experts(self.switch_mlp(x, inds), weights)  # [T, A, M] -> [T, M]


class DecoderLayer(PreNormDecoderLayer):
    """Pre-norm attention, then the pre-norm ``block_sparse_moe``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(
            Attention(_attention_config(args)),
            SparseMoeBlock(args),
            args.hidden_size,
            args.rms_norm_eps,
            LayerNames(ffn="block_sparse_moe"),
        )


class Model(CausalLM):
    """Mixtral causal language model (the model protocol of ``models.base``)."""

    # No quant_overrides: mlx-lm's mixtral has no quantization predicate, so mlx-community's
    # conversions quantize every module (the router included) alike, and ours match them.

    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, norm)
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a checkpoint (publisher or MLX layout, float or quantized) to our parameters.

        The publisher's ``block_sparse_moe.experts.{e}.w1/w3/w2`` are stacked into
        ``block_sparse_moe.switch_mlp.gate_proj/up_proj/down_proj`` ``[E, out, in]``; the
        MLX layout already has those names and passes through, so sanitizing twice changes
        nothing. A tied model drops any saved head.

        Args:
            weights: Checkpoint tensors by name (modified in place).

        Returns:
            Tensors named as this model's parameters.
        """
        if self.args.tie_word_embeddings:
            weights = drop_prefixes(weights, ["lm_head."])
        blocks = [f"model.layers.{i}.block_sparse_moe" for i in range(self.args.num_hidden_layers)]
        return stack_experts(weights, blocks, self.args.num_local_experts, names=_EXPERT_NAMES)
