"""gpt-oss (gpt-oss-20b, gpt-oss-120b): OpenAI's open-weight mixture-of-experts transformer.

A pre-norm decoder (RMSNorm) whose layers alternate between *sliding-window* attention (each
query sees the last ``sliding_window`` positions, itself included; 128 in the release) and
full causal attention, as ``layer_types`` lists them. Attention is grouped-query with biases
on all four projections, YaRN rotary embeddings (factor 32 over a 4,096-token original
context, ``truncate: false``: the ramp between interpolated and original frequencies starts
and ends at fractional channels) and one learned *sink* logit per head, which joins every
softmax without contributing a value, so a head can attend to nothing. The feed-forward
block is a sparse MoE with no shared expert: a linear router with a bias scores the E
experts, the k best logits are kept and softmaxed among themselves (``topk_softmax``), and
each expert is a gated MLP with biases and gpt-oss's *clamped* SwiGLU:

    gate = min(gate, limit);  up = clip(up, -limit, limit)
    h = (up + 1) * gate * sigmoid(alpha * gate)          alpha = 1.702, limit = 7.0

The output head is separate from the embedding. Source: OpenAI, "gpt-oss-120b & gpt-oss-20b
Model Card" (arXiv:2508.10925, 2025), section 2; OpenAI's reference code and transformers'
``GptOssForCausalLM`` fix the details above.

Checkpoints. The publisher (``openai/gpt-oss-*``) fuses each layer's experts:
``mlp.experts.gate_up_proj`` holds gate and up *interleaved* along the output dimension
(even rows gate, odd rows up), with ``gate_up_proj_bias`` ``[E, 2F]`` and
``down_proj`` / ``down_proj_bias``. The release stores the two weights in MXFP4
(``*_blocks`` ``[E, out, in / 32, 16]`` and ``*_scales``, see ``models/mxfp4.py``), which
``sanitize`` hands to MLX's ``mxfp4`` mode as they are, keeping the experts at 4 bits; a
float export (transformers' ``save_pretrained``) stores them as ``[E, in, out]``
(``gate_up_proj`` ``[E, M, 2F]``, ``down_proj`` ``[E, F, M]``). The MLX layout (mlx-lm,
mlx-community's ``gpt-oss-*-MXFP4-Q8`` and friends) already has our names:
``mlp.experts.{gate,up,down}_proj.{weight,scales,bias}`` and ``mlp.router``.

This file does not do: the harmony chat and tool format (a text-format concern), training
pieces (router auxiliary loss, dropout), or ``hidden_act`` other than the clamped SwiGLU.

Shape legend: B = batch, L = new tokens, T = B*L tokens, M = hidden size, E = experts,
A = experts per token (top-k), F = expert hidden width, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import mxfp4
from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack
from moeserve.models.errors import CheckpointError
from moeserve.models.layers.attention import Attention, AttentionConfig, gqa_config
from moeserve.models.layers.decoder import PreNormDecoderLayer
from moeserve.models.layers.moe import SwitchGLU, combine_experts, topk_softmax
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.layers.rope import RopeConfig, rope_config_from
from moeserve.models.quantize import QuantOverride

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' GptOssConfig rotary defaults, for a config that names none (the release's).
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


@dataclass
class ModelArgs(BaseModelArgs):
    """gpt-oss ``config.json`` fields; defaults are transformers' ``GptOssConfig``."""

    hidden_size: int  # M, the residual stream width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads H
    intermediate_size: int  # F, each expert's hidden width
    num_local_experts: int  # E, routed experts per layer
    num_experts_per_tok: int  # A, experts each token is sent to (top-k)
    vocab_size: int  # V
    model_type: str = "gpt_oss"  # registry key
    num_key_value_heads: int | None = None  # K for grouped-query attention; None means K = H
    head_dim: int | None = None  # per-head width D; None means M // H (the release sets 64)
    sliding_window: int | None = 128  # positions a sliding layer sees (itself included)
    layer_types: list[str] | None = None  # per layer "sliding_attention"/"full_attention";
    # None alternates, sliding first (transformers' default)
    attention_bias: bool = True  # biases on the q/k/v and o projections
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    swiglu_alpha: float = 1.702  # sigmoid gain of the experts' clamped SwiGLU
    swiglu_limit: float = 7.0  # clamp of the gate (above) and up (both sides) before it
    hidden_act: str = "silu"  # nominal: the experts' unit is always the clamped SwiGLU
    tie_word_embeddings: bool = False  # output head shares the embedding (never in the release)
    rope_theta: float = 150000.0  # RoPE base (the release's spelling)
    rope_scaling: dict[str, Any] | None = None  # YaRN settings (the release's spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers 5's spelling of both (wins)
    max_position_embeddings: int = 131072  # trained context; YaRN falls back to it

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = [
                SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ValueError(f"layer_types holds unknown types {unknown}; known: {SLIDING}, {FULL}")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"1..{self.num_local_experts}"
            )

    @property
    def rope(self) -> RopeConfig:
        """Rotary settings; with none in the config, transformers' gpt-oss YaRN defaults."""
        fields = vars(self)
        if not (self.rope_scaling or self.rope_parameters):
            fields = fields | {"rope_scaling": DEFAULT_ROPE}
        return rope_config_from(fields, default_theta=150000.0)

    def window(self, layer: int) -> int | None:
        """The attention window of decoder layer ``layer``.

        Args:
            layer: Layer index from 0.

        Returns:
            ``sliding_window`` for a sliding layer, None for full attention (and for every
            layer when the config has no window, as transformers reads it).
        """
        return self.sliding_window if self.layer_types[layer] == SLIDING else None


def _attention_config(args: ModelArgs, layer: int) -> AttentionConfig:
    """gpt-oss's attention: biased q/k/v/o, learned sinks, a window on sliding layers."""
    bias = args.attention_bias
    return gqa_config(
        args, qkv_bias=bias, o_bias=bias, sinks=True, sliding_window=args.window(layer)
    )


def clamped_swiglu(gate: mx.array, up: mx.array, alpha: float, limit: float) -> mx.array:
    """gpt-oss's gated unit: ``(clip(up) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``.

    The gate is clamped from above only (a very negative gate already gives ~0), the linear
    part on both sides; the ``+ 1`` lets an expert pass ``g * sigmoid(alpha g)`` through even
    where ``up`` is zero. ``alpha = 1.702`` makes ``x * sigmoid(alpha x)`` the sigmoid
    approximation of GELU.

    Args:
        gate: Gate projection output ``[..., F]``.
        up: Up projection output ``[..., F]``.
        alpha: Sigmoid gain.
        limit: Clamp.

    Returns:
        ``[..., F]``.
    """
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return (up + 1) * (gate * mx.sigmoid(alpha * gate))


class SparseMoeBlock(nn.Module):
    """gpt-oss's MoE: a biased router, top-k-then-softmax, E biased clamped-SwiGLU experts.

    1. ``router(x)`` (a linear map with a bias) gives one logit per expert ``[T, E]``.
    2. The k largest logits are kept and a softmax over just those k gives the mixing
       weights, which sum to one (``topk_softmax``).
    3. Each selected expert computes ``down(clamped_swiglu(gate(x), up(x)))``, every
       projection with its bias, and the outputs are summed with the weights ``[T, M]``.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        M, F, E = args.hidden_size, args.intermediate_size, args.num_local_experts
        self.top_k = args.num_experts_per_tok
        self.router = nn.Linear(M, E, bias=True)
        unit = partial(clamped_swiglu, alpha=args.swiglu_alpha, limit=args.swiglu_limit)
        self.experts = SwitchGLU(M, F, E, bias=True, activation=unit)

    def __call__(self, x: mx.array) -> mx.array:
        """Route and mix.

        Args:
            x: Normalised hidden states ``[T, M]``.

        Returns:
            ``[T, M]``.
        """
        inds, weights = topk_softmax(self.router(x), self.top_k)  # [T, A], [T, A]
        return combine_experts(self.experts(x, inds), weights)  # [T, A, M] -> [T, M]


class Model(CausalLM):
    """gpt-oss causal language model (the model protocol of ``models.base``)."""

    # As mlx-lm's gpt_oss quantization predicate: the router, which picks every token's
    # experts, stays at 8 bits when the rest goes to 4.
    quant_overrides = (QuantOverride(("mlp.router",), bits=8, group_size=64),)

    def __init__(self, args: ModelArgs) -> None:
        M = args.hidden_size
        layers = [
            PreNormDecoderLayer(
                Attention(_attention_config(args, i)), SparseMoeBlock(args), M, args.rms_norm_eps
            )
            for i in range(args.num_hidden_layers)
        ]
        stack = DecoderStack(args.vocab_size, M, layers, RMSNorm(M, eps=args.rms_norm_eps))
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a publisher (MXFP4 or float) or MLX-layout checkpoint to our parameters.

        Per layer, the publisher's fused experts become ``mlp.experts.{gate,up,down}_proj``:
        MXFP4 blocks are reinterpreted as MLX's packed words and kept with their scales,
        float weights are turned from ``[E, in, out]`` to ``[E, out, in]``, and the
        interleaved gate/up rows (weights, scales, biases) are split even/odd. MLX-layout
        tensors already have our names and pass through, so sanitizing twice changes nothing.

        Args:
            weights: Checkpoint tensors by name (modified in place).

        Returns:
            Tensors named as this model's parameters.

        """
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp.experts"
            for fused, split in (("gate_up_proj", True), ("down_proj", False)):
                for part, value in _fused_parts(weights, f"{prefix}.{fused}").items():
                    if split:
                        # Interleaved along out: even rows gate, odd rows up. Contiguous
                        # copies, so the matmuls never read through a strided view.
                        weights[f"{prefix}.gate_proj.{part}"] = mx.contiguous(value[:, 0::2])
                        weights[f"{prefix}.up_proj.{part}"] = mx.contiguous(value[:, 1::2])
                    else:
                        weights[f"{prefix}.down_proj.{part}"] = value
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights


def _fused_parts(weights: dict[str, mx.array], name: str) -> dict[str, mx.array]:
    """Pop the publisher's tensors of one fused expert parameter, in MLX's ``[E, out, ...]``.

    Args:
        weights: Checkpoint tensors (the popped ones are removed).
        name: E.g. ``model.layers.0.mlp.experts.gate_up_proj``.

    Returns:
        ``{"weight", "scales", "bias"}`` as present: MXFP4 words ``[E, out, in / 8]`` and
        scales ``[E, out, in / 32]``, or a float weight ``[E, out, in]``; the bias ``[E, out]``.
    """
    parts: dict[str, mx.array] = {}
    blocks = weights.pop(f"{name}{mxfp4.BLOCKS_SUFFIX}", None)
    if blocks is not None:
        parts["weight"] = mxfp4.blocks_to_mlx(blocks, f"{name}{mxfp4.BLOCKS_SUFFIX}")
        scales = weights.pop(f"{name}{mxfp4.SCALES_SUFFIX}", None)
        if scales is None:
            raise CheckpointError(f"{name}{mxfp4.BLOCKS_SUFFIX} has no {name}{mxfp4.SCALES_SUFFIX}")
        parts["scales"] = scales
    dense = weights.pop(name, None)
    if dense is not None:
        parts["weight"] = mx.contiguous(dense.swapaxes(-1, -2))  # transformers: [E, in, out]
    bias = weights.pop(f"{name}_bias", None)
    if bias is not None:
        parts["bias"] = bias
    return parts
