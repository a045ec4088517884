"""Bailing-MoE (inclusionAI's Ling family: Ling-lite/plus, Ling 2.0 mini/flash/1T).

A pre-norm decoder-only transformer. Attention is grouped-query with one fused
``query_key_value`` projection and a ``dense`` output projection, optional per-head RMSNorm of
queries and keys (``query_layernorm``/``key_layernorm``), and rotary embeddings over
``rotary_dim`` (or ``partial_rotary_factor`` of each head's) channels. The first
``first_k_dense_replace`` layers use a dense SwiGLU MLP; every later layer is a
Mixture-of-Experts block: a router scores E fine-grained experts (softmax in Ling 1, sigmoid
with a selection-only ``expert_bias`` and group pruning in Ling 2.0, i.e. DeepSeek-V3's
auxiliary-loss-free routing), the top k are renormalised and scaled by
``routed_scaling_factor``, and always-on shared experts are added. With ``norm_head`` the
output projection was trained with each hidden dimension's column normalised to unit length.
Sources: Ling Team, "Every FLOP Counts: Scaling a 300B Mixture-of-Experts LING LLM without
Premium GPUs" (arXiv:2503.05139) and "Every Activation Boosted: Scaling General Reasoner to 1
Trillion Open Language Foundation" (Ling 2.0, arXiv:2510.22115). Reference numerics: mlx-lm's
``bailing_moe`` (transformers has no implementation).

This file does not do: MTP layers or the linear-attention hybrids (``bailing_moe_linear``,
``bailing_hybrid``), ``norm_head`` together with tied embeddings (rejected: the publisher's
code would normalise the shared embedding matrix too), a router bias (``mlp.gate.bias``),
or training-only flags (``moe_router_enable_routed_scaling``, ``norm_softmax``, dropouts),
which mlx-lm ignores too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack, FirstKDenseArgs, StackNames
from moeserve.models.layers.attention import Attention, AttentionConfig, AttentionNames, gqa_config
from moeserve.models.layers.decoder import LayerNames, PreNormDecoderLayer
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.layers.moe import SharedExpertMoE, SwitchGLU, grouped_topk
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.layers.rope import RopeConfig, rope_config_from
from moeserve.models.quantize import QuantOverride
from moeserve.models.sanitize import drop_prefixes, rename, stack_experts

# Shape legend: B = batch, L = new tokens, T = B*L flattened tokens, M = hidden size,
# E = routed experts, A = experts per token (top-k), V = vocabulary.

_NORM_HEAD_EPS = 1e-7  # the publisher's epsilon in the column norm


@dataclass
class ModelArgs(FirstKDenseArgs, BaseModelArgs):
    """Bailing-MoE configuration (``config.json``).

    Defaults follow mlx-lm: Ling 1's and Ling 2.0's own config classes disagree on several
    (``use_bias``, ``rms_norm_eps``), and the released configs set those keys explicitly.
    """

    hidden_size: int  # M, the residual stream width
    intermediate_size: int  # hidden width of the dense MLP in the first layers
    moe_intermediate_size: int  # hidden width of each routed expert
    num_experts: int  # E, routed experts per MoE layer
    num_experts_per_tok: int  # A, experts each token is sent to (top-k)
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA)
    vocab_size: int  # V
    model_type: str = "bailing_moe"  # registry key
    head_dim: int | None = None  # per-head width; None = hidden_size // num_attention_heads
    num_shared_experts: int = 0  # always-on experts, fused into one MLP (0 = none)
    moe_shared_expert_intermediate_size: int | None = None  # shared width; None = moe width
    moe_router_enable_shared_expert: bool = True  # False switches the shared experts off
    first_k_dense_replace: int = 0  # layers [0, k) are dense, the rest are MoE
    score_function: str = "softmax"  # router scores: "softmax" (Ling 1) or "sigmoid" (Ling 2)
    moe_router_enable_expert_bias: bool = False  # selection-only per-expert bias (Ling 2)
    n_group: int = 1  # expert groups G for group pruning (1 = no pruning)
    topk_group: int = 4  # groups kept per token (used only when n_group > 1)
    norm_topk_prob: bool = True  # renormalise the k kept scores to sum to one
    routed_scaling_factor: float = 1.0  # multiplier on the routed experts' weights
    use_qk_norm: bool = False  # RMSNorm each query and key head before the rotation
    use_qkv_bias: bool = False  # bias on the fused query_key_value projection
    use_bias: bool = False  # biases on the output projection and every MLP/expert
    norm_head: bool = False  # lm_head trained with unit-norm columns (see Model.sanitize)
    tie_word_embeddings: bool = False  # output projection reuses the input embedding matrix
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    hidden_act: str = "silu"  # MLP activation; only SwiGLU (silu) exists in this family
    rotary_dim: int | None = None  # rotated channels per head; None = partial_rotary_factor
    partial_rotary_factor: float = 1.0  # fraction of each head's channels that rotate
    rope_theta: float = 10000.0  # rotary base (pre-transformers-5 spelling)
    rope_scaling: dict[str, Any] | None = None  # rotary scaling (pre-transformers-5 spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers 5's rotary settings (wins)
    max_position_embeddings: int = 16384  # trained context; YaRN reads it

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"score_function {self.score_function!r} is not supported")
        if self.norm_head and self.tie_word_embeddings:
            raise ValueError("norm_head with tie_word_embeddings is not supported")
        E, G = self.num_experts, self.n_group
        if G > 1 and (E % G or not 0 < self.topk_group <= G):
            raise ValueError(f"n_group={G}, topk_group={self.topk_group} do not fit {E} experts")
        kept = E if G <= 1 else self.topk_group * (E // G)
        if not 0 < self.num_experts_per_tok <= kept:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds {kept}")

    @property
    def rope(self) -> RopeConfig:
        """Rotary settings, from whichever spelling the config used (``rotary_dim`` wins)."""
        partial = self.partial_rotary_factor
        if self.rotary_dim is not None:
            # RoPE rotates int(head_dim * factor) channels; nudge the factor up by one ulp
            # if the division rounded it down, so that the product lands on rotary_dim.
            partial = self.rotary_dim / self.head_dim
            if int(self.head_dim * partial) < self.rotary_dim:
                partial = math.nextafter(partial, math.inf)
        return rope_config_from(
            {
                "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling,
                "rope_parameters": self.rope_parameters,
                "partial_rotary_factor": partial,
                "max_position_embeddings": self.max_position_embeddings,
            }
        )


def _attention_config(args: ModelArgs) -> AttentionConfig:
    """Bailing's attention: fused QKV named ``query_key_value``, output named ``dense``."""
    return gqa_config(
        args,
        qkv_bias=args.use_qkv_bias,
        o_bias=args.use_bias,
        qk_norm_eps=args.rms_norm_eps if args.use_qk_norm else None,
        names=AttentionNames(
            qkv="query_key_value", o="dense", q_norm="query_layernorm", k_norm="key_layernorm"
        ),
    )


class Gate(nn.Module):
    """The router: ``gate_proj`` (E logits per token) and, in Ling 2.0, ``expert_bias`` ``[E]``.

    ``expert_bias`` only steers which experts are selected, never their weights, and stays
    float32 (see ``Model.cast_predicate``).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        E = args.num_experts
        self.gate_proj = nn.Linear(args.hidden_size, E, bias=False)
        if args.moe_router_enable_expert_bias:
            self.expert_bias = mx.zeros((E,), dtype=mx.float32)
        self.args = args

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Pick experts for each token (the algorithm is ``models.layers.moe.grouped_topk``).

        Args:
            x: ``[T, M]``.

        Returns:
            Expert ids ``[T, A]`` and their float32 weights ``[T, A]``.
        """
        a = self.args
        return grouped_topk(
            self.gate_proj(x),  # [T, E]
            a.num_experts_per_tok,
            score_function=a.score_function,
            correction_bias=self.get("expert_bias"),
            n_group=a.n_group,
            topk_group=a.topk_group,
            normalize=a.norm_topk_prob,
            scaling_factor=a.routed_scaling_factor,
        )


class SparseMoeBlock(SharedExpertMoE):
    """Routed experts chosen by ``Gate`` plus optional always-on shared experts, summed.

    For each token x: the gate scores the E experts (softmax, or sigmoid plus the selection
    bias), prunes groups when ``n_group > 1``, keeps the top k, renormalises and scales their
    weights; the k SwiGLU experts run and are summed with those weights; the shared experts,
    stored as one SwiGLU MLP of ``num_shared_experts * moe_shared_expert_intermediate_size``,
    run on every token and are added unweighted.
    """

    def __init__(self, args: ModelArgs) -> None:
        M = args.hidden_size
        width = (args.moe_shared_expert_intermediate_size or args.moe_intermediate_size) * (
            args.num_shared_experts if args.moe_router_enable_shared_expert else 0
        )
        super().__init__(
            Gate(args),
            SwitchGLU(M, args.moe_intermediate_size, args.num_experts, args.use_bias),
            GatedMLP(M, width, args.use_bias) if width > 0 else None,
        )


class DecoderLayer(PreNormDecoderLayer):
    """A pre-norm layer: a dense MLP in the first ``first_k_dense_replace``, then the MoE block.

    The attention sub-module is named ``attention`` (``self_attn`` elsewhere).
    """

    def __init__(self, args: ModelArgs, layer: int) -> None:
        M = args.hidden_size
        sparse = args.is_sparse(layer)
        ffn = SparseMoeBlock(args) if sparse else GatedMLP(M, args.intermediate_size, args.use_bias)
        attention = Attention(_attention_config(args))
        names = LayerNames(attention="attention")
        super().__init__(attention, ffn, M, args.rms_norm_eps, names)


class Model(CausalLM):
    """Bailing-MoE causal language model (the model protocol of ``models.base``).

    The inner model is ``models.base.DecoderStack`` under the MLX-layout names
    (``model.word_embeddings``, ``model.layers``, ``model.norm``).
    """

    # The router is tiny but every token's expert choice hangs on it, so mlx-lm keeps it at
    # 8 bits when the rest goes to 4; these are that exception's parameters.
    ROUTER_SUFFIX = "mlp.gate.gate_proj"
    ROUTER_BITS = 8
    ROUTER_GROUP_SIZE = 64

    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        names = StackNames(embedding="word_embeddings")
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, norm, names)
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    @property
    def quant_overrides(self) -> tuple[QuantOverride, ...]:
        """Precision exceptions for quantization: the routers at ``ROUTER_BITS`` bits."""
        return (QuantOverride((self.ROUTER_SUFFIX,), self.ROUTER_BITS, self.ROUTER_GROUP_SIZE),)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a checkpoint (publisher or MLX layout, float or quantized) to our parameters.

        From the publisher's layout: each MoE layer's per-expert tensors are stacked into
        ``mlp.switch_mlp.*`` ``[E, out, in]`` for ``SwitchGLU``, the router matrix
        ``mlp.gate.weight`` becomes ``mlp.gate.gate_proj.weight`` (it is an ``nn.Linear``
        here so that it can be quantized at its own precision), and with ``norm_head`` the
        head is normalised (see ``_normalize_head``). An MLX-layout checkpoint passes
        through, so sanitizing twice changes nothing.

        Args:
            weights: Checkpoint tensors by name (modified in place).

        Returns:
            Tensors named as this model's parameters.
        """
        if self.args.tie_word_embeddings:
            weights = drop_prefixes(weights, ["lm_head."])  # the head *is* the embedding
        if self.args.norm_head:
            _normalize_head(weights)
        sparse = [
            f"model.layers.{i}.mlp"
            for i in range(self.args.num_hidden_layers)
            if self.args.is_sparse(i)
        ]
        weights = stack_experts(weights, sparse, self.args.num_experts)
        return rename(weights, ".mlp.gate.weight", ".mlp.gate.gate_proj.weight")

    def cast_predicate(self, name: str) -> bool:
        """Whether tensor ``name`` may be cast to the serving dtype.

        Args:
            name: Parameter name.

        Returns:
            False for the routers' ``expert_bias`` (kept float32), else True.
        """
        return not name.endswith("expert_bias")


def _normalize_head(weights: dict[str, mx.array]) -> None:
    """Divide each column of ``lm_head.weight`` ``[V, M]`` by its L2 norm, in place.

    Why: Ling trains with ``norm_head``: logits are taken against the head with every hidden
    dimension (a column; the norm runs over the vocabulary) scaled to unit length, while the
    checkpoint stores the raw matrix. The publisher's code normalises it, in float32, on the
    first forward pass; doing it once here gives the same logits with a plain matmul. The
    result stays float32 (rounding it to a half-precision checkpoint's dtype moves logits by
    ~5e-4); the loader's dtype cast, if asked for, still applies. Normalising a normalised
    head changes it by ~1e-7 relative, so this is idempotent to float rounding (mlx-lm's
    MLX-layout float checkpoints were normalised when written). A quantized head
    (``lm_head.scales``, packed integer weight) was normalised before quantization and must
    not be touched: dividing packed integers destroys it (as mlx-lm's own sanitize does).
    """
    w = weights.get("lm_head.weight")
    if w is None or "lm_head.scales" in weights or not mx.issubdtype(w.dtype, mx.floating):
        return
    w32 = w.astype(mx.float32)  # [V, M]
    norm = mx.linalg.norm(w32, axis=0, keepdims=True) + _NORM_HEAD_EPS  # [1, M]
    weights["lm_head.weight"] = w32 / norm
