"""MiniMax-M2 (M2, M2.1, M2.5): full-attention GQA with whole-projection qk-norm, sigmoid MoE.

A pre-norm decoder-only transformer, every layer the same. Attention is grouped-query softmax
attention with an explicit ``head_dim`` (48 x 128 = 6144 query channels over a 3072-wide
residual stream in the release) and no biases. Before the heads are split, the whole
projected query vector and the whole key vector each go through one RMSNorm with a weight per
channel (``qk_norm_type: "per_layer"``: one mean square over all heads, not one per head as
in GLM-4 or Qwen3). Rotary embeddings are partial: the first ``rotary_dim`` channels of every
head rotate (64 of 128 in the release), the rest carry no position. Every layer's feed-forward
block is a Mixture-of-Experts with no shared expert: each of E SwiGLU experts gets an
independent sigmoid score, a learned ``e_score_correction_bias`` shifts which k experts are
*selected* (DeepSeek-V3's auxiliary-loss-free balancing) without entering their weights, and
the k unbiased scores are renormalised to sum to one; no group pruning, no scaling factor.
Sources: MiniMax, "MiniMax-M2" model card and release notes (huggingface.co/MiniMaxAI,
October 2025); routing from DeepSeek-AI, "DeepSeek-V3 Technical Report" (arXiv:2412.19437),
section 2.1.2; query-key normalisation from Henry et al., "Query-Key Normalization for
Transformers" (arXiv:2010.04245).

Config spellings: the Hub's ``config.json`` says ``model_type: "minimax_m2"`` (transformers'
name); mlx-lm files this model under ``minimax`` and some converted configs use that, which
is also the model type of the older MiniMax-Text-01 / MiniMax-M1 (lightning attention
hybrids), so a config listing any lightning-attention layer is refused here rather than
loaded wrongly. Names: the MLX layout (mlx-lm's) keeps the publisher's
``block_sparse_moe.gate`` (an ``nn.Linear``, quantized at 8 bits as mlx-lm does),
``block_sparse_moe.e_score_correction_bias`` (on the block, not the gate) and stacks the
per-expert ``experts.{e}.w1/w3/w2`` into ``switch_mlp.gate_proj/up_proj/down_proj``.
The released weights are block-scaled FP8; ``models.fp8`` decodes them before ``sanitize``.

This file does not do: the multi-token-prediction modules (``use_mtp``, ``num_mtp_modules``:
any ``model.layers.N`` with N >= num_hidden_layers is dropped; the release ships none),
``routed_scaling_factor`` (none of transformers, vLLM or mlx-lm applies one to MiniMax-M2,
and its configs carry none), routers other than sigmoid, shared experts
(``shared_intermediate_size`` must be 0), per-head qk-norm or lightning attention, the
``<minimax:tool_call>`` format (server/text/formats), or training-time pieces (router jitter,
auxiliary loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack
from moeserve.models.layers.attention import Attention, AttentionConfig, gqa_config
from moeserve.models.layers.decoder import LayerNames, PreNormDecoderLayer
from moeserve.models.layers.moe import SwitchGLU, combine_experts, grouped_topk
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.layers.rope import RopeConfig, rope_config_from
from moeserve.models.quantize import QuantOverride
from moeserve.models.sanitize import drop_prefixes, stack_experts

# Shape legend: B = batch, L = new tokens, T = B*L flattened tokens, M = hidden size,
# H = query heads, K = key/value heads, D = head dim, E = experts, A = experts per token.

# The publisher's per-expert projection names -> ours (w1 gate, w3 up, w2 down).
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass
class ModelArgs(BaseModelArgs):
    """MiniMax-M2 configuration (``config.json``); defaults are the release's values."""

    vocab_size: int  # V
    hidden_size: int  # M, the residual stream width
    intermediate_size: int  # F, each expert's hidden width
    num_hidden_layers: int  # decoder layers, not counting MTP modules
    num_attention_heads: int  # H, query heads
    num_key_value_heads: int  # K, key/value heads (GQA)
    num_local_experts: int  # E, experts per MoE layer
    num_experts_per_tok: int  # A, experts each token is sent to (top-k)
    model_type: str = "minimax_m2"  # registry key ("minimax" is an alias)
    head_dim: int | None = None  # D; None = hidden_size // num_attention_heads (mlx-lm's rule)
    rotary_dim: int | None = None  # channels of each head that rotate; None = all of them
    partial_rotary_factor: float | None = None  # the same as a fraction (transformers 5)
    rope_theta: float = 5_000_000.0  # rotary base (pre-transformers-5 spelling)
    rope_scaling: dict[str, Any] | None = None  # rotary scaling (pre-transformers-5 spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers 5's rotary settings (wins)
    max_position_embeddings: int = 196608  # trained context; YaRN reads it
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm, qk-norm included
    use_qk_norm: bool = True  # RMSNorm the projected queries and keys before the rotation
    qk_norm_type: str = "per_layer"  # one norm over all heads' channels; the only kind here
    scoring_func: str = "sigmoid"  # router score function; only sigmoid is implemented
    use_routing_bias: bool = True  # the router has an e_score_correction_bias
    shared_intermediate_size: int = 0  # shared-expert width; must be 0 (M2 has none)
    hidden_act: str = "silu"  # expert activation; only SwiGLU (silu)
    tie_word_embeddings: bool = False  # output projection reuses the input embedding matrix
    attn_type_list: list[int] | None = None  # per layer: 1 softmax, 0 lightning (Text-01)
    layer_types: list[str] | None = None  # transformers' spelling of the same, for Text-01

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        lightning = [t for t in self.attn_type_list or [] if t != 1]
        lightning += [t for t in self.layer_types or [] if t != "full_attention"]
        if lightning:
            raise ValueError(
                "lightning (linear) attention layers are not supported: this is a "
                "MiniMax-Text-01 / MiniMax-M1 config, not MiniMax-M2"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.scoring_func != "sigmoid":
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported (only sigmoid)")
        if self.use_qk_norm and self.qk_norm_type != "per_layer":
            raise ValueError(f"qk_norm_type {self.qk_norm_type!r} is not supported (per_layer)")
        if self.shared_intermediate_size:
            raise ValueError("shared experts (shared_intermediate_size > 0) are not supported")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} does not fit "
                f"{self.num_local_experts} experts"
            )

    @property
    def rope(self) -> RopeConfig:
        """Rotary settings; ``rotary_dim`` (the release's key) gives the rotating fraction.

        ``rope_parameters.partial_rotary_factor``, where transformers 5 writes it, still wins.
        """
        fields = vars(self)
        if self.rotary_dim is not None:
            fields = fields | {"partial_rotary_factor": self.rotary_dim / self.head_dim}
        return rope_config_from(fields)


class MiniMaxAttention(Attention):
    """GQA attention whose q/k RMSNorm spans every head at once, before the heads are split.

    ``q_norm`` has H*D weights and ``k_norm`` K*D: each token's whole projected query (and
    key) is divided by one root mean square, then scaled per channel. The rest (projections,
    partial rotation, cache, softmax) is the shared ``Attention``'s.
    """

    def __init__(self, cfg: AttentionConfig, qk_norm_eps: float | None) -> None:
        super().__init__(cfg)
        self.qk_norm = qk_norm_eps is not None
        if self.qk_norm:
            self.q_norm = RMSNorm(cfg.num_heads * cfg.head_dim, eps=qk_norm_eps)
            self.k_norm = RMSNorm(cfg.num_kv_heads * cfg.head_dim, eps=qk_norm_eps)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries ``[B, L, H*D]`` and keys ``[B, L, K*D]``, each normalised whole; values as is."""
        q, k, v = super()._project(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class SparseMoeBlock(nn.Module):
    """E SwiGLU experts, k per token, chosen by sigmoid scores shifted by a selection bias.

    For each token x: ``s = sigmoid(gate(x))`` over all E experts (float32); the k experts
    with the largest ``s + e_score_correction_bias`` are selected; their weights are their
    *unbiased* ``s``, renormalised to sum to one; the output is the weighted sum of those k
    experts' SwiGLU outputs. That is ``grouped_topk`` with a single group and no scaling.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        M, E = args.hidden_size, args.num_local_experts
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(M, E, bias=False)  # quantizable: mlx-lm keeps it at 8 bits
        self.switch_mlp = SwitchGLU(M, args.intermediate_size, E)
        if args.use_routing_bias:
            # float32 (see Model.cast_predicate): added to sigmoid scores in (0, 1), where
            # half precision would blur the differences that decide which experts run.
            self.e_score_correction_bias = mx.zeros((E,), dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        """Route and mix.

        Args:
            x: Normalised hidden states, flattened ``[T, M]``.

        Returns:
            ``[T, M]``.
        """
        logits = self.gate(x.astype(mx.float32))  # [T, E], routed in float32 as published
        inds, weights = grouped_topk(  # [T, A], [T, A]
            logits,
            self.top_k,
            score_function="sigmoid",
            correction_bias=self.get("e_score_correction_bias"),
            normalize=True,
        )
        return combine_experts(self.switch_mlp(x, inds), weights)  # [T, A, M] -> [T, M]


class DecoderLayer(PreNormDecoderLayer):
    """A pre-norm layer: ``MiniMaxAttention``, then ``SparseMoeBlock`` (``block_sparse_moe``)."""

    def __init__(self, args: ModelArgs) -> None:
        eps = args.rms_norm_eps if args.use_qk_norm else None
        attention = MiniMaxAttention(gqa_config(args), qk_norm_eps=eps)
        names = LayerNames(ffn="block_sparse_moe")
        super().__init__(
            attention, SparseMoeBlock(args), args.hidden_size, args.rms_norm_eps, names
        )


class Model(CausalLM):
    """MiniMax-M2 causal language model (the model protocol of ``models.base``)."""

    # mlx-lm quantizes the router at 8 bits (group 64) when the rest goes to 4.
    quant_overrides = (QuantOverride(("block_sparse_moe.gate",), bits=8, group_size=64),)

    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, norm)
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a checkpoint (publisher or MLX layout, float or quantized) to our parameters.

        From the publisher's layout (FP8 already decoded by ``models.fp8``): MTP modules
        (``model.layers.N`` and up, N = num_hidden_layers) are dropped, and each layer's
        ``block_sparse_moe.experts.{e}.w1/w3/w2`` are stacked into
        ``block_sparse_moe.switch_mlp.gate_proj/up_proj/down_proj`` ``[E, out, in]``. A tied
        model drops a stray ``lm_head``, and without ``use_routing_bias`` a stray correction
        bias goes too. An MLX-layout checkpoint passes through; sanitizing twice changes
        nothing.

        Args:
            weights: Checkpoint tensors by name (modified in place).

        Returns:
            Tensors named as this model's parameters.
        """
        n = self.args.num_hidden_layers
        stored = {int(k.split(".")[2]) for k in weights if k.startswith("model.layers.")}
        drop = [f"model.layers.{i}." for i in stored if i >= n]
        if self.args.tie_word_embeddings:
            drop.append("lm_head.")  # the head *is* the embedding
        weights = drop_prefixes(weights, drop)
        if not self.args.use_routing_bias:
            weights = {k: v for k, v in weights.items() if not k.endswith("correction_bias")}
        blocks = [f"model.layers.{i}.block_sparse_moe" for i in range(n)]
        return stack_experts(weights, blocks, self.args.num_local_experts, _EXPERT_NAMES)

    def cast_predicate(self, name: str) -> bool:
        """Whether tensor ``name`` may be cast to the serving dtype.

        Args:
            name: Parameter name.

        Returns:
            False for the routers' ``e_score_correction_bias`` (kept float32), else True.
        """
        return not name.endswith("e_score_correction_bias")
