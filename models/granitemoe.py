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

from models.base import BaseModelArgs, CausalLM, run_layers
from models.layers.attention import Attention, AttentionConfig
from models.layers.moe import LinearRouter, SwitchGLU, combine_experts, topk_softmax
from models.layers.norm import RMSNorm
from models.layers.rope import RopeConfig, rope_config_from
from models.quantize import QuantOverride


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

    @property
    def rope(self) -> RopeConfig:
        """Rotary settings from whichever spelling the config used."""
        return rope_config_from(
            {
                "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling,
                "rope_parameters": self.rope_parameters,
                "max_position_embeddings": self.max_position_embeddings,
            }
        )


def attention_config(args: ModelArgs) -> AttentionConfig:
    """The shared attention configured for Granite (its own softmax scale, optional biases).

    Args:
        args: Model arguments.

    Returns:
        The attention configuration.
    """
    return AttentionConfig(
        hidden_size=args.hidden_size,
        num_heads=args.num_attention_heads,
        num_kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        rope=args.rope,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        scale=args.attention_multiplier,  # muP: replaces 1/sqrt(head_dim)
    )


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
            x: Normalised hidden states ``[B, L, M]``.

        Returns:
            ``[B, L, M]``.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, M]
        inds, weights = topk_softmax(self.router(x), self.top_k)  # [T, A], [T, A]
        y = combine_experts(self.switch_mlp(x, inds), weights)  # [T, A, M] -> [T, M]
        return y.reshape(shape)


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MoE, each branch scaled by ``residual_multiplier``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(attention_config(args))
        self.block_sparse_moe = SparseMoeBlock(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.residual_multiplier = args.residual_multiplier

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Any | None) -> mx.array:
        """Apply the layer.

        Args:
            x: ``[B, L, M]``.
            mask: From ``models.base.attention_mask``.
            cache: This layer's KV cache, or ``None``.

        Returns:
            ``[B, L, M]``.
        """
        h = x + self.self_attn(self.input_layernorm(x), mask, cache) * self.residual_multiplier
        moe = self.block_sparse_moe(self.post_attention_layernorm(h))  # [B, L, M]
        return h + moe * self.residual_multiplier


class GraniteMoeModel(nn.Module):
    """Embeddings (times ``embedding_multiplier``), the decoder layers and the final RMSNorm."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.embedding_multiplier = args.embedding_multiplier

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        """Hidden states after the final norm.

        Args:
            inputs: Token ids ``[B, L]``.
            cache: One KV cache per layer, or ``None``.

        Returns:
            ``[B, L, M]``.
        """
        h = self.embed_tokens(inputs) * self.embedding_multiplier  # [B, L, M]
        h = run_layers(h, self.layers, cache)
        return self.norm(h)


class Model(CausalLM):
    """GraniteMoE causal LM: the model protocol of ``models.base`` plus loading hooks."""

    # `convert --quantize` keeps these modules at higher precision, as mlx-lm's granitemoe
    # quantization predicate does: the router decides every token's experts, o_proj and
    # the expert down projections write straight into the residual stream, and the
    # untied lm_head sets the logits directly.
    sensitive_bits = 8
    sensitive_group_size = 64

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = GraniteMoeModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self, inputs: mx.array, cache: list[Any] | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits for every position.

        Args:
            inputs: Token ids, int32 ``[B, L]``.
            cache: One KV cache per layer (from ``make_cache``), or ``None``.
            last_only: Logits for the last position only (``L`` = 1 in the result).

        Returns:
            Logits ``[B, L, V]`` (``[B, 1, V]`` with ``last_only``).
        """
        h = self.model(inputs, cache)  # [B, L, M]
        if last_only:  # prefill samples one position: skip the head's V x M work for the rest
            h = h[:, -1:]
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        return logits / self.args.logits_scaling  # muP output multiplier

    @property
    def layers(self) -> list[DecoderLayer]:
        """The decoder layers."""
        return self.model.layers

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

    def cast_predicate(self, name: str) -> bool:
        """Whether tensor ``name`` may be cast to the serving dtype.

        Granite has no tensor that must stay float32 (no router correction bias), so every
        floating tensor may be cast.

        Args:
            name: A sanitized parameter name.

        Returns:
            Always True.
        """
        return True
