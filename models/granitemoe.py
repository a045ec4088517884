"""GraniteMoE: IBM's Granite 3.0 / PowerMoE mixture-of-experts decoder.

A Mixtral-shaped decoder (pre-RMSNorm, grouped-query attention with RoPE, a sparse SwiGLU MoE
in every layer, no shared expert) trained with muP-style width scaling, which leaves four
scalar multipliers in the forward pass. Each must be applied exactly where training applied
it, or the logits come out wrong by a constant factor per layer:

* ``embedding_multiplier`` scales the token embeddings before the first layer;
* ``attention_multiplier`` *replaces* ``1/sqrt(head_dim)`` as the softmax scale;
* ``residual_multiplier`` scales the attention and the MoE output before each is added back
  to the residual stream (both branches, every layer);
* ``logits_scaling`` *divides* the final logits.

The router is top-k-then-softmax: keep the k largest router logits and softmax over only
those (``topk_softmax`` in ``layers/moe.py``). The publisher stores each layer's experts
pre-stacked: ``block_sparse_moe.input_linear.weight`` ``[E, 2F, M]`` holds gate (first F
rows) then up, and ``output_linear.weight`` ``[E, M, F]`` is down; ``sanitize`` splits them.

References: IBM Granite Team, "Granite 3.0 Language Models" (IBM, October 2024); the
multipliers come from the muP setup of Shen et al., "Power Scheduler: A Batch Size and Token
Number Agnostic Learning Rate Scheduler" (arXiv:2408.13359), which trained PowerMoE-3B.

This file does not do training-time pieces (router jitter, auxiliary load-balancing loss,
dropout) and knows nothing of loading files or quantizing: it defines the modules, their
MLX-layout parameter names (mlx-lm's, so mlx-community checkpoints load unchanged) and the
checkpoint name mapping.

Shape legend: B = batch, L = new tokens, T = B*L tokens, M = hidden, E = experts,
A = active experts per token, F = expert hidden dim, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack
from moeserve.models.layers.attention import Attention, AttentionConfig, gqa_config
from moeserve.models.layers.decoder import LayerNames, PreNormDecoderLayer
from moeserve.models.layers.moe import LinearRouter, SwitchGLU, combine_experts, topk_softmax
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.quantize import QuantOverride


@dataclass
class ModelArgs(BaseModelArgs):
    """GraniteMoE ``config.json`` fields; defaults are transformers' ``GraniteMoeConfig``."""

    model_type: str  # "granitemoe"
    hidden_size: int  # M
    num_hidden_layers: int  # decoder layers
    intermediate_size: int  # F, each expert's hidden width
    num_attention_heads: int  # query heads H
    vocab_size: int  # V
    num_local_experts: int  # E, routed experts per layer
    num_experts_per_tok: int  # A, experts each token is sent to (top-k)
    num_key_value_heads: int | None = None  # K for grouped-query attention; None means K = H
    head_dim: int | None = None  # per-head width; None means M // H
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    hidden_act: str = "silu"  # expert activation; SwiGLU (silu) is the only one supported
    attention_bias: bool = False  # biases on q/k/v *and* o projections
    embedding_multiplier: float = 1.0  # muP: token embeddings are multiplied by this
    attention_multiplier: float = 1.0  # muP: the attention softmax scale (not 1/sqrt(D))
    residual_multiplier: float = 1.0  # muP: each branch output is multiplied before the add
    logits_scaling: float = 1.0  # muP: the final logits are divided by this
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens (Granite 3.0 configs: true)
    max_position_embeddings: int = 2048  # trained context; YaRN-style scaling reads it
    rope_theta: float = 10000.0  # RoPE base (pre-transformers-5 spelling)
    rope_scaling: dict[str, Any] | None = None  # RoPE scaling (pre-transformers-5 spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers-5 spelling of both above

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")


def _attention_config(args: ModelArgs) -> AttentionConfig:
    """Granite's attention: its own softmax scale, optional biases on all four projections."""
    bias = args.attention_bias
    return gqa_config(args, qkv_bias=bias, o_bias=bias, scale=args.attention_multiplier)  # muP


class SparseMoeBlock(nn.Module):
    """Granite's sparse MoE: top-k-then-softmax routing over E SwiGLU experts, no shared expert.

    Each token's router logits are cut to the k largest, a softmax over those k gives the
    mixing weights (they sum to one), and the token's output is the weighted sum of its k
    experts' outputs. Experts run stacked through ``SwitchGLU`` (one gathered matmul per
    projection), never in a Python loop.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = LinearRouter(args.hidden_size, args.num_local_experts)
        self.switch_mlp = SwitchGLU(
            args.hidden_size, args.intermediate_size, args.num_local_experts
        )

    def __call__(self, x: mx.array) -> mx.array:
        """Route and mix.

        Args:
            x: Normalised hidden states, flattened ``[T, M]``.

        Returns:
            ``[T, M]``.
        """
        inds, weights = topk_softmax(self.router(x), self.top_k)  # [T, A], [T, A]
        return combine_experts(self.switch_mlp(x, inds), weights)  # [T, A, M] -> [T, M]


class DecoderLayer(PreNormDecoderLayer):
    """Pre-norm attention then pre-norm MoE, each branch scaled by ``residual_multiplier``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(
            Attention(_attention_config(args)),
            SparseMoeBlock(args),
            args.hidden_size,
            args.rms_norm_eps,
            LayerNames(ffn="block_sparse_moe"),
            residual_scale=args.residual_multiplier,  # muP, on both branches
        )


class Model(CausalLM):
    """GraniteMoE causal LM: the model protocol of ``models.base`` plus loading hooks.

    The inner model is ``models.base.DecoderStack`` (``model.embed_tokens``, ``model.layers``,
    ``model.norm``) with the embeddings multiplied by ``embedding_multiplier``.
    """

    # `convert --quantize` keeps these modules at higher precision, as mlx-lm's granitemoe
    # quantization predicate does: the router decides every token's experts, o_proj and
    # the expert down projections write straight into the residual stream, and the
    # untied lm_head sets the logits directly.
    sensitive_bits = 8
    sensitive_group_size = 64

    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        stack = DecoderStack(
            args.vocab_size,
            args.hidden_size,
            layers,
            norm,
            embedding_scale=args.embedding_multiplier,  # muP
        )
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    def logits(self, h: mx.array) -> mx.array:
        """The output head, divided by ``logits_scaling`` (muP's output multiplier).

        Args:
            h: Final hidden states ``[B, L, M]``.

        Returns:
            ``[B, L, V]``.
        """
        return super().logits(h) / self.args.logits_scaling

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a publisher or MLX-layout checkpoint to our parameter names.

        The publisher's experts are already stacked per layer, so no ``stack_experts`` is
        needed: ``input_linear`` ``[E, 2F, M]`` splits along its rows into gate (first half,
        as transformers' ``chunk(2)`` reads it) and up; ``output_linear`` ``[E, M, F]`` is
        ``down_proj`` as is. MLX-layout checkpoints (float or quantized) already use our
        names and pass through; so does an already-sanitized dictionary.

        Args:
            weights: Checkpoint tensors by name.

        Returns:
            Tensors under our parameter names.
        """
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.block_sparse_moe"
            fused = weights.pop(f"{prefix}.input_linear.weight", None)  # [E, 2F, M]
            if fused is not None:
                gate, up = mx.split(fused, 2, axis=1)  # [E, F, M] each
                weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
                weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
            down = weights.pop(f"{prefix}.output_linear.weight", None)  # [E, M, F]
            if down is not None:
                weights[f"{prefix}.switch_mlp.down_proj.weight"] = down
        if self.args.tie_word_embeddings:
            # Some exports write the tied matrix out twice; the embedding is the one we use.
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def quant_overrides(self) -> tuple[QuantOverride, ...]:
        """Modules quantized at ``sensitive_bits`` instead of the default (see the class)."""
        suffixes = (
            "block_sparse_moe.router.layer",
            "self_attn.o_proj",
            "block_sparse_moe.switch_mlp.down_proj",
        )
        if not self.args.tie_word_embeddings:
            suffixes += ("lm_head",)
        return (QuantOverride(suffixes, self.sensitive_bits, self.sensitive_group_size),)
