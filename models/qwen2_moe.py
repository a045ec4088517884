"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): routed experts plus a gated shared expert.

A pre-norm decoder-only transformer: grouped-query attention with biases on the q/k/v
projections (none on the output) and full rotary embeddings, then a feed-forward block that is
either a dense SwiGLU MLP or a sparse Mixture-of-Experts block. In the MoE block a linear
router scores E small ("fine-grained") experts, a softmax over all E picks the top k (optionally
renormalised, ``norm_topk_prob``), and *in parallel* one larger shared expert runs on every
token; a per-token sigmoid gate scales the shared expert's output before it is added. Which
layers are sparse is set by ``decoder_sparse_step`` (every n-th layer) and ``mlp_only_layers``
(always dense). Sources: "Qwen1.5-MoE: Matching 7B Model Performance with 1/3 Activated
Parameters" (Qwen team blog, 2024, https://qwenlm.github.io/blog/qwen-moe/) and the Qwen2
Technical Report (Yang et al. 2024, arXiv:2407.10671).

This file does not do: sliding-window attention (``use_sliding_window``; no released Qwen2-MoE
checkpoint enables it, so such a config is rejected rather than served wrongly), training-only
pieces (router auxiliary loss, router logits output), or transformers 5's fused
``experts.gate_up_proj`` tensors (checkpoints saved with ``save_original_format=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack
from moeserve.models.layers.attention import Attention, AttentionConfig, gqa_config
from moeserve.models.layers.decoder import PreNormDecoderLayer
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.layers.moe import SwitchGLU, combine_experts, softmax_topk
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.sanitize import drop_prefixes, stack_experts

# Shape legend: B = batch, L = new tokens, T = B*L flattened tokens, M = hidden size,
# E = routed experts, A = experts per token (top-k), V = vocabulary.


@dataclass
class ModelArgs(BaseModelArgs):
    """Qwen2-MoE configuration (``config.json``); defaults are transformers' ``Qwen2MoeConfig``."""

    hidden_size: int  # M, the residual stream width
    num_hidden_layers: int  # decoder layers
    intermediate_size: int  # hidden width of the dense MLP in non-sparse layers
    num_attention_heads: int  # query heads
    num_experts: int  # E, routed experts per sparse layer
    num_experts_per_tok: int  # A, experts each token is sent to (top-k)
    moe_intermediate_size: int  # hidden width of each routed expert
    shared_expert_intermediate_size: int  # hidden width of the always-on shared expert
    vocab_size: int  # V
    model_type: str = "qwen2_moe"  # registry key
    num_key_value_heads: int | None = None  # key/value heads (GQA); None = one per query head
    head_dim: int | None = None  # per-head width; None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    hidden_act: str = "silu"  # MLP activation; only SwiGLU (silu) exists in this family
    qkv_bias: bool = True  # biases on q/k/v (transformers 5 spells it out; older configs imply it)
    norm_topk_prob: bool = False  # renormalise the k kept router probabilities to sum to one
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] | None = None  # ... and i is not listed here (these stay dense)
    tie_word_embeddings: bool = False  # output projection reuses the input embedding matrix
    use_sliding_window: bool = False  # sliding-window attention; unsupported, must be False
    rope_theta: float = 10000.0  # rotary base (pre-transformers-5 spelling)
    rope_scaling: dict[str, Any] | None = None  # rotary scaling (pre-transformers-5 spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers 5's rotary settings (wins)
    max_position_embeddings: int = 32768  # trained context; YaRN reads it

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.num_experts}"
            )
        if self.use_sliding_window:
            raise ValueError("use_sliding_window=true is not supported (no sliding-window cache)")

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has the MoE block (else the dense MLP).

        Args:
            layer: Layer index from 0.

        Returns:
            True for a sparse (MoE) layer.
        """
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


def _attention_config(args: ModelArgs) -> AttentionConfig:
    """Qwen2-MoE's attention: GQA, biases on q/k/v only, full rotary embeddings."""
    return gqa_config(args, qkv_bias=args.qkv_bias)


class SparseMoeBlock(nn.Module):
    """Routed experts plus one sigmoid-gated shared expert, summed.

    For each token x (shapes in the legend above):

    1. Router: ``gate(x)`` gives one logit per expert ``[T, E]``; a softmax over all E experts
       turns them into probabilities and the k most probable experts are kept ``[T, A]``. With
       ``norm_topk_prob`` the kept probabilities are rescaled to sum to one; without it (the
       released checkpoints) they keep their share of the full softmax, so a token whose mass
       is spread over many experts gets a smaller routed contribution.
    2. Routed experts: each selected expert (a SwiGLU MLP of ``moe_intermediate_size``) runs
       on the token and the outputs are summed with the router weights ``[T, M]``.
    3. Shared expert: one larger SwiGLU MLP runs on every token. Its output is multiplied by
       ``sigmoid(shared_expert_gate(x))``, a learned per-token scalar in (0, 1), so the model
       decides per token how much common knowledge to mix in with the specialised experts.
    4. The block returns routed + gated shared.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        M, E = args.hidden_size, args.num_experts
        self.top_k = args.num_experts_per_tok
        self.renormalize_p = 1.0 if args.norm_topk_prob else None  # p = 1: weights sum to one
        self.gate = nn.Linear(M, E, bias=False)
        self.switch_mlp = SwitchGLU(M, args.moe_intermediate_size, E)
        self.shared_expert = GatedMLP(M, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(M, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """Apply the block to flattened tokens.

        Args:
            x: ``[T, M]``.

        Returns:
            ``[T, M]``.
        """
        inds, weights = softmax_topk(self.gate(x), self.top_k, self.renormalize_p)  # [T, A] x2
        routed = combine_experts(self.switch_mlp(x, inds), weights)  # [T, M]
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [T, M]
        return routed + shared


class DecoderLayer(PreNormDecoderLayer):
    """A pre-norm layer whose feed-forward block is the ``SparseMoeBlock`` in sparse layers.

    The other layers have a dense SwiGLU MLP of ``intermediate_size`` (see
    ``ModelArgs.is_sparse``).
    """

    def __init__(self, args: ModelArgs, layer: int) -> None:
        M = args.hidden_size
        sparse = args.is_sparse(layer)
        ffn = SparseMoeBlock(args) if sparse else GatedMLP(M, args.intermediate_size)
        super().__init__(Attention(_attention_config(args)), ffn, M, args.rms_norm_eps)


class Model(CausalLM):
    """Qwen2-MoE causal language model (the model protocol of ``models.base``)."""

    # No quant_overrides: mlx-lm quantizes this family uniformly (its qwen2_moe has no
    # quantization predicate), and so our conversions and mlx-community's agree module for
    # module.

    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, norm)
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a checkpoint (publisher or MLX layout, float or quantized) to our parameters.

        The publisher stores one tensor per routed expert; ``SwitchGLU`` wants each layer's
        experts stacked into one ``[E, out, in]`` tensor per projection, which is the MLX
        layout's ``mlp.switch_mlp.*``. Tensors already stacked pass through, so sanitizing
        twice changes nothing.

        Args:
            weights: Checkpoint tensors by name (modified in place).

        Returns:
            Tensors named as this model's parameters.
        """
        if self.args.tie_word_embeddings:
            # A tied model's head *is* the embedding; a saved copy would be an unexpected tensor.
            weights = drop_prefixes(weights, ["lm_head."])
        sparse = [
            f"model.layers.{i}.mlp"
            for i in range(self.args.num_hidden_layers)
            if self.args.is_sparse(i)
        ]
        return stack_experts(weights, sparse, self.args.num_experts)
