"""DeepSeek-V3 (V3, V3.1, R1; also Kimi-K2's text model): latent attention and routed experts.

A pre-norm decoder-only transformer. Attention is multi-head latent attention (MLA, from
DeepSeek-V2): keys and values are decompressed per head from a low-rank latent, and only the
latent and one shared rotary key are cached (``layers/mla.py``). The first
``first_k_dense_replace`` layers have a dense SwiGLU MLP; every later layer is the
DeepSeekMoE block: ``n_routed_experts`` fine-grained routed experts chosen per token by
sigmoid scores with a selection-only ``e_score_correction_bias`` (auxiliary-loss-free load
balancing), pruned group by group (``n_group``/``topk_group``), renormalised and scaled by
``routed_scaling_factor``, plus ``n_shared_experts`` always-on experts. The checkpoints
also carry ``num_nextn_predict_layers`` multi-token-prediction (MTP) layers after the last
decoder layer (``model.layers.61`` in DeepSeek-V3). Sources: DeepSeek-AI, "DeepSeek-V3
Technical Report" (arXiv:2412.19437), sections 2.1.1 (MLA) and 2.1.2 (DeepSeekMoE and its
routing); DeepSeek-AI, "DeepSeek-V2" (arXiv:2405.04434), section 2.1 (MLA).

The MoE block is GLM-4-MoE's (``models/glm4_moe.py``): GLM-4.5 took DeepSeek-V3's block with
its names and config keys unchanged, so both families use that one class and the shared
``grouped_topk`` router.

Checkpoint layouts: the publisher's (one tensor per expert, ``self_attn.kv_b_proj``; the
released DeepSeek-V3 weights are block-scaled FP8, which ``models.fp8`` decodes before
``sanitize``) and mlx-lm's (``switch_mlp`` stacks, ``kv_b_proj`` split into ``embed_q`` /
``unembed_out``), float or quantized, both load.

This file does not do: the MTP layers (dropped in ``sanitize``; no speculative decoding),
``moe_layer_freq`` other than 1 (every released config has 1), router methods other than
``noaux_tc`` with sigmoid scores, DeepSeek-V3.2's sparse attention (``deepseek_v32``), the
INT4 (compressed-tensors) checkpoints of Kimi-K2-Thinking, or training-only pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack, FirstKDenseArgs
from moeserve.models.glm4_moe import MoE
from moeserve.models.layers.decoder import PreNormDecoderLayer
from moeserve.models.layers.mla import MultiHeadLatentAttention, mla_config, split_kv_b_proj
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.sanitize import drop_prefixes, stack_experts

# Shape legend: M = hidden size, E = routed experts, F = expert width; MLA's letters are in
# layers/mla.py (H heads, N/P/V head widths, R latent width, Q query bottleneck).


@dataclass
class ModelArgs(FirstKDenseArgs, BaseModelArgs):
    """DeepSeek-V3 config (``config.json``); defaults are transformers' ``DeepseekV3Config``."""

    vocab_size: int  # V
    hidden_size: int  # M, the residual stream width
    intermediate_size: int  # hidden width of the dense MLP in the first layers
    moe_intermediate_size: int  # F, hidden width of each routed (and each shared) expert
    num_hidden_layers: int  # decoder layers, not counting the MTP layers after them
    num_attention_heads: int  # H, query heads (each with its own decompression of c_kv)
    n_routed_experts: int  # E, routed experts per MoE layer
    num_experts_per_tok: int  # experts each token is sent to (top-k)
    kv_lora_rank: int  # R, width of the cached latent c_kv
    qk_nope_head_dim: int  # N, per-head query/key channels without position
    qk_rope_head_dim: int  # P, per-head rotary query channels and the shared rotary key
    v_head_dim: int  # V, per-head value width
    model_type: str = "deepseek_v3"  # registry key
    q_lora_rank: int | None = 1536  # Q, query bottleneck (q_a_proj/q_b_proj); None: q_proj
    num_key_value_heads: int | None = None  # unused: every head reads the one shared latent
    n_shared_experts: int | None = 1  # always-on experts, fused into one MLP of n * F
    first_k_dense_replace: int = 3  # layers [0, k) are dense, the rest are MoE
    moe_layer_freq: int = 1  # MoE every n-th layer after the dense ones; only 1 is supported
    n_group: int = 8  # expert groups G for group pruning (1 = no pruning)
    topk_group: int = 4  # groups kept per token
    norm_topk_prob: bool = True  # renormalise the k kept sigmoid scores to sum to one
    routed_scaling_factor: float = 2.5  # multiplier on the routed experts' weights
    scoring_func: str = "sigmoid"  # router score function; only sigmoid is implemented
    topk_method: str = "noaux_tc"  # router method; only noaux_tc is implemented
    rms_norm_eps: float = 1e-6  # epsilon of the layer and final RMSNorms
    hidden_act: str = "silu"  # MLP activation; only SwiGLU (silu) exists in this family
    attention_bias: bool = False  # biases on q_a_proj, kv_a_proj_with_mqa and o_proj
    tie_word_embeddings: bool = False  # output projection reuses the input embedding matrix
    num_nextn_predict_layers: int = 1  # MTP layers stored after the decoder layers (dropped)
    rope_interleave: bool = True  # rotary channels stored as interleaved pairs
    rope_theta: float = 10000.0  # rotary base (pre-transformers-5 spelling)
    rope_scaling: dict[str, Any] | None = None  # YaRN settings (pre-transformers-5 spelling)
    rope_parameters: dict[str, Any] | None = None  # transformers 5's rotary settings (wins)
    max_position_embeddings: int = 4096  # context length; YaRN reads it

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            raise ValueError(
                f"router scoring_func={self.scoring_func!r} / topk_method={self.topk_method!r} "
                "is not supported (only 'sigmoid' / 'noaux_tc')"
            )
        if self.moe_layer_freq != 1:
            raise ValueError(f"moe_layer_freq={self.moe_layer_freq} is not supported (only 1)")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        E, G = self.n_routed_experts, self.n_group
        if E % G or not 0 < self.topk_group <= G:
            raise ValueError(f"n_group={G}, topk_group={self.topk_group} do not fit {E} experts")
        if not 0 < self.num_experts_per_tok <= self.topk_group * (E // G):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                f"{self.topk_group * (E // G)} experts left after group pruning"
            )


class DecoderLayer(PreNormDecoderLayer):
    """A pre-norm layer: MLA, then a dense SwiGLU MLP (first layers) or the MoE block."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        M = args.hidden_size
        ffn = MoE(args) if args.is_sparse(layer) else GatedMLP(M, args.intermediate_size)
        attention = MultiHeadLatentAttention(mla_config(args))
        super().__init__(attention, ffn, M, args.rms_norm_eps)


class Model(CausalLM):
    """DeepSeek-V3 causal language model (the model protocol of ``models.base``)."""

    # No quant_overrides: mlx-lm's deepseek_v3 has no quantization predicate, so everything
    # quantizable is quantized uniformly; the router stays float because ``MoEGate`` is not
    # an nn.Linear, as in mlx-lm.

    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, norm)
        super().__init__(args, stack, tied=args.tie_word_embeddings)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a checkpoint (publisher or MLX layout, float or quantized) to our parameters.

        Four steps, each a no-op on an MLX-layout checkpoint (so sanitizing twice changes
        nothing): drop the MTP layers (every ``model.layers.N`` with N >=
        ``num_hidden_layers``) and precomputed rotary tables; drop a stray ``lm_head`` of a
        tied model; stack each MoE layer's per-expert tensors into ``mlp.switch_mlp.*``
        ``[E, out, in]``; split each ``self_attn.kv_b_proj`` into ``embed_q`` and
        ``unembed_out`` (``layers.mla.split_kv_b_proj``). FP8 weights arrive decoded
        (``models.fp8``).

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
        weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
        sparse = [f"model.layers.{i}.mlp" for i in range(n) if self.args.is_sparse(i)]
        stack_experts(weights, sparse, self.args.n_routed_experts)
        cfg = mla_config(self.args)
        for i in range(n):
            split_kv_b_proj(weights, f"model.layers.{i}.self_attn", cfg)
        return weights

    def cast_predicate(self, name: str) -> bool:
        """Whether tensor ``name`` may be cast to the serving dtype.

        Args:
            name: Parameter name.

        Returns:
            False for the routers' ``e_score_correction_bias`` (kept float32), else True.
        """
        return not name.endswith("e_score_correction_bias")
