"""GLM-4-MoE (GLM-4.5, GLM-4.5-Air, GLM-4.6): sigmoid-routed, grouped experts plus shared experts.

A pre-norm decoder-only transformer. Attention is grouped-query with an explicit ``head_dim``
(wider than ``hidden_size / heads`` in the released models), optional biases on q/k/v (never on
the output), optional per-head RMSNorm of queries and keys, and *partial* rotary embeddings:
only the first ``partial_rotary_factor`` of each head's channels rotate. The first
``first_k_dense_replace`` layers use a dense SwiGLU MLP; every later layer is a
Mixture-of-Experts block in the style of DeepSeek-V3: each expert gets an independent sigmoid
score, a learned per-expert ``e_score_correction_bias`` (auxiliary-loss-free load balancing)
shifts which experts are *selected* without changing their weights, experts are pruned group by
group, the kept weights are renormalised and multiplied by ``routed_scaling_factor``, and
``n_shared_experts`` always-on experts are added. The published checkpoints also carry
``num_nextn_predict_layers`` multi-token-prediction (MTP) layers after the last decoder layer,
used for speculative decoding. Source: GLM-4.5 Team, "GLM-4.5: Agentic, Reasoning, and Coding
(ARC) Foundation Models" (arXiv:2508.06471); routing from DeepSeek-V3
(arXiv:2412.19437), section 2.1.2.

This file does not do: the MTP layers (dropped in ``sanitize``; no speculative decoding),
router methods other than ``noaux_tc`` with sigmoid scores (other values are rejected),
training-only pieces (router logits, load-balancing updates), or transformers 5's fused
``experts.gate_up_proj`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack, FirstKDenseArgs
from moeserve.models.layers.attention import Attention, AttentionConfig, gqa_config
from moeserve.models.layers.decoder import PreNormDecoderLayer
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.layers.moe import SharedExpertMoE, SwitchGLU, grouped_topk
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.sanitize import drop_prefixes, stack_experts

# Shape legend: B = batch, L = new tokens, T = B*L flattened tokens, M = hidden size,
# E = routed experts, A = experts per token (top-k), V = vocabulary.


@dataclass
class ModelArgs(FirstKDenseArgs, BaseModelArgs):
    """GLM-4-MoE configuration (``config.json``); defaults are transformers' ``Glm4MoeConfig``."""

    vocab_size: int  # V
    hidden_size: int  # M, the residual stream width
    intermediate_size: int  # hidden width of the dense MLP in the first layers
    moe_intermediate_size: int  # hidden width of each routed (and each shared) expert
    num_hidden_layers: int  # decoder layers, not counting the MTP layers after them
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA)
    n_routed_experts: int  # E, routed experts per MoE layer
    num_experts_per_tok: int  # A, experts each token is sent to (top-k)
    model_type: str = "glm4_moe"  # registry key
    head_dim: int | None = None  # per-head width; None = hidden_size // num_attention_heads
    n_shared_experts: int | None = 1  # always-on experts, fused into one MLP of n * width
    first_k_dense_replace: int = 1  # layers [0, k) are dense, the rest are MoE
    n_group: int = 1  # expert groups G for group pruning (1 = no pruning)
    topk_group: int = 1  # groups kept per token
    norm_topk_prob: bool = True  # renormalise the k kept sigmoid scores to sum to one
    routed_scaling_factor: float = 1.0  # multiplier on the routed experts' weights
    scoring_func: str = "sigmoid"  # router score function; only sigmoid is implemented
    topk_method: str = "noaux_tc"  # router method; only DeepSeek-V3's noaux_tc is implemented
    use_qk_norm: bool = False  # RMSNorm each query and key head before the rotation
    attention_bias: bool = False  # biases on q/k/v (the output projection never has one)
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    hidden_act: str = "silu"  # MLP activation; only SwiGLU (silu) exists in this family
    tie_word_embeddings: bool = False  # output projection reuses the input embedding matrix
    num_nextn_predict_layers: int = 1  # MTP layers stored after the decoder layers (dropped)
    partial_rotary_factor: float = 0.5  # fraction of each head's channels that rotate
    rope_theta: float = 10000.0  # rotary base (pre-transformers-5 spelling)
    rope_scaling: dict[str, Any] | None = None  # rotary scaling (pre-transformers-5 spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers 5's rotary settings (wins)
    max_position_embeddings: int = 131072  # trained context; YaRN reads it

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            raise ValueError(
                f"router scoring_func={self.scoring_func!r} / topk_method={self.topk_method!r} "
                "is not supported (only 'sigmoid' / 'noaux_tc')"
            )
        E, G = self.n_routed_experts, self.n_group
        if E % G or not 0 < self.topk_group <= G:
            raise ValueError(f"n_group={G}, topk_group={self.topk_group} do not fit {E} experts")
        if not 0 < self.num_experts_per_tok <= self.topk_group * (E // G):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                f"{self.topk_group * (E // G)} experts left after group pruning"
            )


def _attention_config(args: ModelArgs) -> AttentionConfig:
    """GLM-4-MoE's attention: GQA, explicit head_dim, optional qk-norm, partial rotary."""
    qk_norm_eps = args.rms_norm_eps if args.use_qk_norm else None
    return gqa_config(args, qkv_bias=args.attention_bias, qk_norm_eps=qk_norm_eps)


class MoEGate(nn.Module):
    """The router: a bias-free projection to E logits plus the selection-only correction bias.

    ``weight`` is a bare ``[E, M]`` matrix rather than an ``nn.Linear`` so that quantization
    leaves it in floating point, as mlx-lm (and so every mlx-community conversion) does.
    ``e_score_correction_bias`` ``[E]`` stays float32 (see ``Model.cast_predicate``): it is
    added to sigmoid scores in (0, 1), and half precision would blur the small differences
    that decide which experts run.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        E = args.n_routed_experts
        self.weight = mx.zeros((E, args.hidden_size))
        self.e_score_correction_bias = mx.zeros((E,), dtype=mx.float32)
        self.top_k = args.num_experts_per_tok
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.normalize = args.norm_topk_prob
        self.scaling = args.routed_scaling_factor

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Pick experts for each token (the algorithm is ``models.layers.moe.grouped_topk``).

        Args:
            x: ``[T, M]``.

        Returns:
            Expert ids ``[T, A]`` and their float32 weights ``[T, A]``.
        """
        logits = x @ self.weight.T  # [T, E]
        return grouped_topk(
            logits,
            self.top_k,
            score_function="sigmoid",
            correction_bias=self.e_score_correction_bias,
            n_group=self.n_group,
            topk_group=self.topk_group,
            normalize=self.normalize,
            scaling_factor=self.scaling,
        )


class MoE(SharedExpertMoE):
    """Routed experts chosen by ``MoEGate`` plus always-on shared experts, summed.

    For each token x: the gate picks k experts and their weights (sigmoid scores, the
    correction bias only steering the choice, group pruning, renormalisation, scaling by
    ``routed_scaling_factor``); the k SwiGLU experts run and are summed with those weights; the
    ``n_shared_experts`` shared experts, stored as one SwiGLU MLP of
    ``n_shared_experts * moe_intermediate_size``, run on every token and are added unweighted.
    """

    def __init__(self, args: ModelArgs) -> None:
        M, F = args.hidden_size, args.moe_intermediate_size
        shared = args.n_shared_experts or 0
        super().__init__(
            MoEGate(args),
            SwitchGLU(M, F, args.n_routed_experts),
            GatedMLP(M, F * shared) if shared > 0 else None,
        )


class DecoderLayer(PreNormDecoderLayer):
    """A pre-norm layer: a dense SwiGLU MLP in the first ``first_k_dense_replace``, then ``MoE``."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        M = args.hidden_size
        ffn = MoE(args) if args.is_sparse(layer) else GatedMLP(M, args.intermediate_size)
        super().__init__(Attention(_attention_config(args)), ffn, M, args.rms_norm_eps)


class Model(CausalLM):
    """GLM-4-MoE causal language model (the model protocol of ``models.base``)."""

    # No quant_overrides: mlx-lm's glm4_moe has no quantization predicate, so everything
    # quantizable is quantized uniformly; the router stays float only because ``MoEGate`` is
    # not an nn.Linear.

    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, norm)
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a checkpoint (publisher or MLX layout, float or quantized) to our parameters.

        Two differences from the publisher's layout: its MTP layers (``model.layers.N`` and
        up, N = num_hidden_layers) are dropped, and each MoE layer's per-expert tensors are
        stacked into ``mlp.switch_mlp.*`` ``[E, out, in]`` for ``SwitchGLU``. An MLX-layout
        checkpoint has neither, so it passes through and sanitizing twice changes nothing.

        Args:
            weights: Checkpoint tensors by name (modified in place).

        Returns:
            Tensors named as this model's parameters.
        """
        n = self.args.num_hidden_layers
        # Drop every layer index >= n rather than exactly num_nextn_predict_layers of them:
        # none of them is a decoder layer, whatever the config says about MTP.
        stored = {int(k.split(".")[2]) for k in weights if k.startswith("model.layers.")}
        drop = [f"model.layers.{i}." for i in stored if i >= n]
        if self.args.tie_word_embeddings:
            drop.append("lm_head.")  # the head *is* the embedding
        weights = drop_prefixes(weights, drop)
        sparse = [f"model.layers.{i}.mlp" for i in range(n) if self.args.is_sparse(i)]
        return stack_experts(weights, sparse, self.args.n_routed_experts)

    def cast_predicate(self, name: str) -> bool:
        """Whether tensor ``name`` may be cast to the serving dtype.

        Args:
            name: Parameter name.

        Returns:
            False for the routers' ``e_score_correction_bias`` (kept float32), else True.
        """
        return not name.endswith("e_score_correction_bias")
