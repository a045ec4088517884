"""Qwen3-Next (Qwen3-Next-80B-A3B): hybrid gated DeltaNet / gated attention with a sparse MoE.

A pre-norm decoder-only transformer whose token mixer alternates by layer (``layer_types``,
or every ``full_attention_interval``-th layer full, 1 in 4 in the release):

* most layers are gated DeltaNet linear attention (``layers/gated_delta.py``: a matrix state
  per value head updated by the gated delta rule, Yang et al. 2024, arXiv:2412.06464), whose
  cache is a fixed-size recurrent state instead of keys and values;
* the others are gated full attention: grouped-query attention with per-head RMSNorm on
  queries and keys, rotary embeddings on the first quarter of each head
  (``partial_rotary_factor``), and ``q_proj`` twice as wide, its second half per head a gate
  whose sigmoid multiplies the attention output before ``o_proj`` (``output_gate``).

The feed-forward block is Qwen2-MoE's (``qwen2_moe.SparseMoeBlock``): a softmax router over
many small experts (512, 10 active per token in the release), ``norm_topk_prob``
renormalisation, and a shared expert scaled by a per-token sigmoid gate; layers left dense by
``decoder_sparse_step`` / ``mlp_only_layers`` have a SwiGLU MLP. Sources: the Qwen team's
Qwen3-Next release (blog post and the model card of Qwen/Qwen3-Next-80B-A3B-Instruct,
September 2025) and transformers' ``Qwen3NextForCausalLM``, the reference our fixtures are
computed with.

Zero-centred norms: the publisher stores the decoder, final and q/k RMSNorm weights as w with
scale ``1 + w`` (weight decay pulls w to 0). The MLX layout (mlx-lm) stores ``1 + w``, so our
norms are plain RMSNorms and ``sanitize`` adds 1 to a publisher checkpoint's. The gated norm
inside the DeltaNet layers is not zero-centred.

Checkpoint layouts (both load; ``sanitize``): the publisher's has one tensor per expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``), convolution weights ``[C, 1, K]`` and
zero-centred norms, plus multi-token-prediction tensors (``mtp.*``); the MLX layout stacks the
experts (``mlp.switch_mlp.*``), stores the convolution as ``[C, K, 1]`` and the norms as
``1 + w``. The convolution's shape is how ``sanitize`` tells them apart. transformers 5's
fused ``experts.gate_up_proj`` / ``experts.down_proj`` also load.

This file does not do: multi-token prediction (the ``mtp.*`` tensors are dropped), padded
batches through the DeltaNet layers (the engine never pads a row), or training-only pieces
(router auxiliary loss and logits). Norm weights are held in the checkpoint's dtype: a
bfloat16 ``1 + w`` is rounded to 8 bits of mantissa, as in mlx-lm, where transformers adds
the 1 in float32.

Shape legend: B = batch, L = new tokens, T = B*L tokens, M = hidden size, E = experts,
C = convolution channels, K = convolution taps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from moeserve.models import qwen2_moe
from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack
from moeserve.models.layers.attention import Attention, AttentionConfig, gqa_config
from moeserve.models.layers.decoder import LayerNames, PreNormDecoderLayer
from moeserve.models.layers.gated_delta import GatedDeltaConfig, GatedDeltaNet
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.quantize import QuantOverride
from moeserve.models.sanitize import drop_prefixes, stack_experts

LINEAR, FULL = "linear_attention", "full_attention"
# Norms stored as w with scale 1 + w by the publisher (Qwen3NextRMSNorm), by name suffix.
ZERO_CENTRED = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
    "model.norm.weight",
)


@dataclass
class ModelArgs(BaseModelArgs):
    """Qwen3-Next configuration (``config.json``); defaults: transformers' ``Qwen3NextConfig``."""

    hidden_size: int  # M, the residual stream width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads of the full-attention layers
    num_experts: int  # E, routed experts per sparse layer
    num_experts_per_tok: int  # experts each token is sent to (top-k)
    moe_intermediate_size: int  # hidden width of each routed expert
    shared_expert_intermediate_size: int  # hidden width of the always-on shared expert
    vocab_size: int  # V
    linear_num_key_heads: int  # Hk, query/key heads of the DeltaNet layers
    linear_num_value_heads: int  # Hv, value heads (= state matrices), a multiple of Hk
    linear_key_head_dim: int  # Dk
    linear_value_head_dim: int  # Dv
    model_type: str = "qwen3_next"  # registry key
    intermediate_size: int = 5632  # hidden width of the dense MLP in non-sparse layers
    num_key_value_heads: int = 2  # key/value heads of the full-attention layers (GQA)
    head_dim: int = 256  # per-head width of the full-attention layers
    linear_conv_kernel_dim: int = 4  # K, taps of the DeltaNet layers' causal convolution
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm (the gated one included)
    hidden_act: str = "silu"  # MLP and convolution activation; only silu exists here
    attention_bias: bool = False  # biases on q/k/v/o of the full-attention layers
    norm_topk_prob: bool = True  # renormalise the k kept router probabilities to sum to one
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] | None = None  # ... and i is not listed here (these stay dense)
    layer_types: list[str] | None = None  # per layer "linear_attention" / "full_attention"
    full_attention_interval: int = 4  # without layer_types: every n-th layer is full
    tie_word_embeddings: bool = False  # output projection reuses the input embedding matrix
    rope_theta: float = 10000.0  # rotary base (pre-transformers-5 spelling)
    rope_scaling: dict[str, Any] | None = None  # rotary scaling (pre-transformers-5 spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers 5's rotary settings (wins)
    partial_rotary_factor: float = 0.25  # fraction of each head's channels that rotate
    max_position_embeddings: int = 32768  # trained context; YaRN reads it

    def __post_init__(self) -> None:
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.layer_types is None:
            n = self.full_attention_interval
            self.layer_types = [FULL if (i + 1) % n == 0 else LINEAR for i in range(self.n)]
        self.layer_types = list(self.layer_types)
        unknown = set(self.layer_types) - {LINEAR, FULL}
        if unknown or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types must name {self.num_hidden_layers} layers, each {LINEAR!r} or "
                f"{FULL!r}; got {self.layer_types}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads={self.linear_num_value_heads} must be a multiple of "
                f"linear_num_key_heads={self.linear_num_key_heads}"
            )
        if self.linear_conv_kernel_dim < 2:  # the layout check in sanitize needs K > 1
            raise ValueError(
                f"linear_conv_kernel_dim must be >= 2, got {self.linear_conv_kernel_dim}"
            )
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.num_experts}"
            )

    @property
    def n(self) -> int:
        """Decoder layers (short for ``num_hidden_layers``)."""
        return self.num_hidden_layers

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


def attention_config(args: ModelArgs) -> AttentionConfig:
    """The full-attention layers: GQA, qk-norm, partial rotary, the sigmoid output gate."""
    return gqa_config(
        args,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        qk_norm_eps=args.rms_norm_eps,
        output_gate=True,
    )


def gated_delta_config(args: ModelArgs) -> GatedDeltaConfig:
    """The DeltaNet layers' shape."""
    return GatedDeltaConfig(
        hidden_size=args.hidden_size,
        num_k_heads=args.linear_num_key_heads,
        num_v_heads=args.linear_num_value_heads,
        head_k_dim=args.linear_key_head_dim,
        head_v_dim=args.linear_value_head_dim,
        conv_kernel=args.linear_conv_kernel_dim,
        norm_eps=args.rms_norm_eps,
    )


class DecoderLayer(PreNormDecoderLayer):
    """A pre-norm layer: a token mixer, then the feed-forward block.

    The mixer is the DeltaNet (``linear_attn``) or gated attention (``self_attn``); the
    feed-forward block is the MoE block (``qwen2_moe.SparseMoeBlock``) or a dense SwiGLU MLP.

    Args:
        args: The configuration.
        layer: Layer index from 0.
        mixer: The DeltaNet class (Qwen3.5 passes its own projections).
    """

    def __init__(self, args: ModelArgs, layer: int, mixer: type[GatedDeltaNet]) -> None:
        M = args.hidden_size
        if args.layer_types[layer] == LINEAR:
            attention, names = mixer(gated_delta_config(args)), LayerNames("linear_attn")
        else:
            attention, names = Attention(attention_config(args)), LayerNames()
        ffn = (
            qwen2_moe.SparseMoeBlock(args)
            if args.is_sparse(layer)
            else GatedMLP(M, args.intermediate_size)
        )
        super().__init__(attention, ffn, M, args.rms_norm_eps, names)


def split_fused_experts(weights: dict[str, mx.array], prefixes: list[str]) -> None:
    """Turn transformers 5's fused experts into the stacked ``switch_mlp`` tensors, in place.

    ``{prefix}.experts.gate_up_proj`` ``[E, 2F, M]`` holds each expert's gate rows then its up
    rows; ``{prefix}.experts.down_proj`` ``[E, M, F]`` is already ``[E, out, in]``.

    Args:
        weights: Checkpoint tensors.
        prefixes: The sparse layers' ``...mlp`` prefixes.
    """
    for prefix in prefixes:
        fused = weights.pop(f"{prefix}.experts.gate_up_proj", None)
        if fused is None:
            continue
        gate, up = mx.split(fused, 2, axis=-2)
        weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
        weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
        down = weights.pop(f"{prefix}.experts.down_proj")
        weights[f"{prefix}.switch_mlp.down_proj.weight"] = down


def publisher_layout(weights: dict[str, mx.array]) -> bool:
    """Whether tensors are in the publisher's layout (zero-centred norms still to shift).

    The convolution weight says it: ``[C, 1, K]`` there, ``[C, K, 1]`` in the MLX layout
    (K > 1 is checked by ``ModelArgs``). A checkpoint without DeltaNet layers falls back on
    its experts: per-expert or fused tensors are the publisher's.
    """
    conv = [v for k, v in weights.items() if k.endswith("conv1d.weight")]
    if conv:
        return conv[0].shape[-1] != 1
    return any(".mlp.experts." in k for k in weights)


class Model(CausalLM):
    """Qwen3-Next causal language model (the model protocol of ``models.base``)."""

    # mlx-lm keeps the router and the shared expert's gate at 8 bits (its quant_predicate):
    # every token's expert choice and shared-expert share go through them.
    quant_overrides = (QuantOverride(("mlp.gate", "shared_expert_gate"), bits=8, group_size=64),)
    mixer: type[GatedDeltaNet] = GatedDeltaNet  # the DeltaNet layers' class

    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i, self.mixer) for i in range(args.num_hidden_layers)]
        norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, norm)
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a checkpoint (publisher or MLX layout, float or quantized) to our parameters.

        Publisher layout: drop ``mtp.*``, stack the experts, move the convolution's kernel
        axis and add 1 to the zero-centred norms (see the module docstring). MLX-layout
        tensors pass through, so sanitizing twice changes nothing.

        Args:
            weights: Checkpoint tensors by name (modified in place).

        Returns:
            Tensors named as this model's parameters.
        """
        drop = ["mtp."] + (["lm_head."] if self.args.tie_word_embeddings else [])
        weights = drop_prefixes(weights, drop)
        if publisher_layout(weights):
            for name, value in weights.items():
                if name.endswith("conv1d.weight"):
                    weights[name] = mx.moveaxis(value, 2, 1)  # [C, 1, K] -> [C, K, 1]
                elif name.endswith(ZERO_CENTRED):
                    weights[name] = (value.astype(mx.float32) + 1.0).astype(value.dtype)
        sparse = [f"model.layers.{i}.mlp" for i in range(self.args.n) if self.args.is_sparse(i)]
        split_fused_experts(weights, sparse)
        return stack_experts(weights, sparse, self.args.num_experts)

    def cast_predicate(self, name: str) -> bool:
        """Whether tensor ``name`` may be cast to the serving dtype.

        Args:
            name: A sanitized parameter name.

        Returns:
            False for ``A_log``: the publisher ships it in float32 and the decay is computed
            in float32 (mlx-lm keeps it so too).
        """
        return not name.endswith(".A_log")
