"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B): routed experts only.

A pre-norm decoder-only transformer: grouped-query attention whose queries and keys are
RMS-normalised per head before the rotary embedding ("qk-norm"), with an explicit
``head_dim`` that need not equal ``hidden_size / num_attention_heads`` (Qwen3-30B-A3B:
2048 / 32 = 64, but 128-wide heads), then a feed-forward block that is a sparse
Mixture-of-Experts block or, in the layers ``decoder_sparse_step`` / ``mlp_only_layers``
leave dense, a SwiGLU MLP. Unlike Qwen2-MoE there is no shared expert: a softmax over all E
fine-grained experts picks the top k, whose probabilities are renormalised to sum to one
when ``norm_topk_prob`` is set (every released Qwen3-MoE sets it). Source: Qwen Team, "Qwen3
Technical Report" (arXiv:2505.09388), section 2 (architecture), and the publisher's
``config.json`` files.

Checkpoint layouts: the publisher stores one tensor per expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``) beside the router ``mlp.gate.weight``; the
MLX layout (mlx-lm / mlx-community) stacks them into ``mlp.switch_mlp.*``. Both load.

This file does not do: sliding-window attention (``use_sliding_window``; no released
Qwen3-MoE enables it, and the references disagree on which layers it would apply to, so such
a config is rejected), training-only pieces (router auxiliary loss, router logits), or
transformers 5's fused ``experts.gate_up_proj`` tensors.

Shape legend: T = B*L flattened tokens, M = hidden size, E = routed experts, A = experts per
token (top-k), D = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import qwen2_moe
from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack
from moeserve.models.layers.attention import Attention, AttentionConfig, gqa_config
from moeserve.models.layers.decoder import PreNormDecoderLayer
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.layers.moe import SwitchGLU, combine_experts, softmax_topk
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.quantize import QuantOverride
from moeserve.models.sanitize import drop_prefixes, stack_experts


@dataclass
class ModelArgs(BaseModelArgs):
    """Qwen3-MoE configuration (``config.json``); defaults are transformers' ``Qwen3MoeConfig``."""

    hidden_size: int  # M, the residual stream width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_experts: int  # E, routed experts per sparse layer
    num_experts_per_tok: int  # A, experts each token is sent to (top-k)
    moe_intermediate_size: int  # hidden width of each routed expert
    vocab_size: int  # V
    model_type: str = "qwen3_moe"  # registry key
    intermediate_size: int = 6144  # hidden width of the dense MLP in non-sparse layers
    num_key_value_heads: int | None = None  # key/value heads (GQA); None = one per query head
    head_dim: int | None = None  # D, per-head width; None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm, the per-head q/k norms included
    hidden_act: str = "silu"  # MLP activation; only SwiGLU (silu) exists in this family
    attention_bias: bool = False  # biases on q/k/v *and* o (all released checkpoints: false)
    norm_topk_prob: bool = False  # renormalise the k kept router probabilities to sum to one
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] | None = None  # ... and i is not listed here (these stay dense)
    tie_word_embeddings: bool = False  # output projection reuses the input embedding matrix
    use_sliding_window: bool = False  # sliding-window attention; unsupported, must be False
    rope_theta: float = 10000.0  # rotary base (pre-transformers-5 spelling)
    rope_scaling: dict[str, Any] | None = None  # rotary scaling, e.g. YaRN (pre-5 spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers 5's rotary settings (wins)
    max_position_embeddings: int = 32768  # trained context; YaRN reads it

    # The dense/sparse layer rule is Qwen2-MoE's, field for field (transformers derives
    # Qwen3-MoE from it), so it is shared rather than copied.
    is_sparse = qwen2_moe.ModelArgs.is_sparse

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
            raise ValueError("use_sliding_window=true is not supported (no released checkpoint)")


def _attention_config(args: ModelArgs) -> AttentionConfig:
    """Qwen3's attention: GQA with per-head q/k RMSNorm (same epsilon as the other norms)."""
    bias = args.attention_bias
    return gqa_config(args, qkv_bias=bias, o_bias=bias, qk_norm_eps=args.rms_norm_eps)


class SparseMoeBlock(nn.Module):
    """Softmax top-k routing over E SwiGLU experts; no shared expert.

    For each token x (shapes in the legend above):

    1. Router: ``gate(x)`` gives one logit per expert ``[T, E]``; a softmax over all E turns
       them into probabilities and the k most probable experts are kept ``[T, A]``
       (``softmax_topk``).
    2. With ``norm_topk_prob`` the k kept probabilities are divided by their sum, so the
       routed output has the same scale whether the router is confident or not; without it
       they keep their share of the full softmax.
    3. Each selected expert runs on the token and the outputs are summed with those weights.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        M, E = args.hidden_size, args.num_experts
        self.top_k = args.num_experts_per_tok
        self.renormalize_p = 1.0 if args.norm_topk_prob else None  # p = 1: weights sum to one
        self.gate = nn.Linear(M, E, bias=False)
        self.switch_mlp = SwitchGLU(M, args.moe_intermediate_size, E)

    def __call__(self, x: mx.array) -> mx.array:
        """Apply the block to flattened tokens.

        Args:
            x: ``[T, M]``.

        Returns:
            ``[T, M]``.
        """
        inds, weights = softmax_topk(self.gate(x), self.top_k, self.renormalize_p)  # [T, A] x2
        return combine_experts(self.switch_mlp(x, inds), weights)  # [T, A, M] -> [T, M]


class DecoderLayer(PreNormDecoderLayer):
    """A pre-norm layer whose feed-forward block is the ``SparseMoeBlock`` in sparse layers.

    The other layers have a dense SwiGLU MLP of ``intermediate_size`` (``ModelArgs.is_sparse``).
    """

    def __init__(self, args: ModelArgs, layer: int) -> None:
        M = args.hidden_size
        sparse = args.is_sparse(layer)
        ffn = SparseMoeBlock(args) if sparse else GatedMLP(M, args.intermediate_size)
        super().__init__(Attention(_attention_config(args)), ffn, M, args.rms_norm_eps)


class Model(CausalLM):
    """Qwen3-MoE causal language model (the model protocol of ``models.base``)."""

    # `convert --quantize` keeps each layer's router at 8 bits, as mlx-lm's qwen3_moe
    # quantization predicate does (so our conversions and mlx-community's agree module for
    # module): the router is tiny, and every token's choice of experts depends on it.
    quant_overrides = (QuantOverride(("mlp.gate",), bits=8, group_size=64),)

    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, norm)
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a checkpoint (publisher or MLX layout, float or quantized) to our parameters.

        The publisher's per-expert tensors are stacked into one ``[E, out, in]`` tensor per
        projection (``mlp.switch_mlp.*``, the MLX layout); tensors already stacked pass
        through, so sanitizing twice changes nothing. A tied model drops any saved head.

        Args:
            weights: Checkpoint tensors by name (modified in place).

        Returns:
            Tensors named as this model's parameters.
        """
        if self.args.tie_word_embeddings:
            weights = drop_prefixes(weights, ["lm_head."])
        sparse = [
            f"model.layers.{i}.mlp"
            for i in range(self.args.num_hidden_layers)
            if self.args.is_sparse(i)
        ]
        return stack_experts(weights, sparse, self.args.num_experts)
