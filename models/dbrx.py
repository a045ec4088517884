"""DBRX: Databricks' fine-grained mixture-of-experts decoder (132B total, 36B active).

Each block is ``NormAttnNorm`` followed by a sparse MoE. ``NormAttnNorm`` is an ordinary
pre-norm attention sub-block that also applies the *next* sub-block's norm: LayerNorm
without bias (``norm_1``) -> attention -> add the residual -> a second bias-free LayerNorm
(``norm_2``). It returns both the updated residual stream and its normalised copy; the MoE
reads the normalised copy and its output is added to the residual. The arithmetic equals a
standard pre-norm block; only the module boundaries differ (and the checkpoint names follow).

Attention is grouped-query with RoPE and a single fused ``Wqkv`` projection whose output is
clamped to ``[-clip_qkv, clip_qkv]``: bounding q, k and v keeps attention logits from growing
without limit, which Databricks (like MPT before it) used to avoid loss spikes in training.
The clamp is part of the function the weights were trained for, so inference applies it too.

The MoE has many small experts (the released model: 16, of which 4 are active): a softmax
over all router logits, the top-k kept, their weights optionally divided by their p-norm
(``moe_normalize_expert_weights`` = p; None skips it), and SwiGLU experts ``w1`` (gate),
``v1`` (up), ``w2`` (down). All experts run stacked in one ``SwitchGLU``; there is one code
path for every batch size (no per-token loop, no training branch).

Reference: Databricks Mosaic Research, "Introducing DBRX: A New State-of-the-Art Open LLM"
(blog, 2024-03-27), https://www.databricks.com/blog/introducing-dbrx-new-state-art-open-llm.

This file does not do training-time pieces (router jitter ``moe_jitter_eps``, load-balancing
loss, dropout) and knows nothing of loading files or quantizing: it defines the modules,
their names and the checkpoint name mapping. Names follow mlx-lm's MLX layout except the
experts, which we hold stacked as ``ffn.switch_mlp``; ``sanitize`` converts both the
publisher's fused tensors and mlx-lm's per-expert linears into it.

Shape legend: B = batch, L = new tokens, T = B*L tokens, M = d_model, E = experts,
A = active experts per token, F = expert hidden dim, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.base import BaseModelArgs, CausalLM, DecoderStack, StackNames
from moeserve.models.layers.attention import Attention, AttentionConfig, AttentionNames
from moeserve.models.layers.moe import LinearRouter, SwitchGLU, combine_experts, softmax_topk
from moeserve.models.layers.rope import RopeConfig, rope_config_from
from moeserve.models.quantize import QuantOverride
from moeserve.models.sanitize import stack_experts

# Publisher / mlx-lm expert tensor -> our stacked SwitchGLU projection.
_EXPERT_NAMES = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}


@dataclass
class ModelArgs(BaseModelArgs):
    """DBRX ``config.json`` fields; defaults are transformers' ``DbrxConfig`` and sub-configs.

    The publisher nests attention and FFN settings in ``attn_config`` / ``ffn_config``;
    ``__post_init__`` reads them into the flat fields at the bottom (not constructor args).
    """

    model_type: str  # "dbrx"
    vocab_size: int  # V
    d_model: int  # M
    n_layers: int  # decoder blocks
    n_heads: int  # query heads H; head_dim = M // H
    attn_config: dict[str, Any] | None = None  # nested attention settings (read below)
    ffn_config: dict[str, Any] | None = None  # nested MoE settings (read below)
    max_seq_len: int = 2048  # trained context; YaRN-style scaling reads it
    rope_parameters: dict[str, Any] | None = None  # transformers-5 rope spelling (scaling)
    # From attn_config:
    kv_n_heads: int = field(init=False)  # K, key/value heads (grouped-query attention)
    clip_qkv: float | None = field(init=False)  # clamp of the fused q/k/v output; None = off
    rope_theta: float = field(init=False)  # RoPE base (the released model: 500000)
    # From ffn_config:
    ffn_hidden_size: int = field(init=False)  # F, each expert's hidden width
    moe_num_experts: int = field(init=False)  # E
    moe_top_k: int = field(init=False)  # A
    moe_normalize_expert_weights: float | None = field(init=False)  # p of the p-norm; None = off

    def __post_init__(self) -> None:
        attn, ffn = self.attn_config or {}, self.ffn_config or {}
        self.kv_n_heads = attn.get("kv_n_heads", 1)
        self.clip_qkv = attn.get("clip_qkv")
        self.rope_theta = attn.get("rope_theta", 10000.0)
        self.ffn_hidden_size = ffn.get("ffn_hidden_size", 3584)
        self.moe_num_experts = ffn.get("moe_num_experts", 4)
        self.moe_top_k = ffn.get("moe_top_k", 1)
        self.moe_normalize_expert_weights = ffn.get("moe_normalize_expert_weights", 1.0)
        act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
        if act != "silu":
            raise ValueError(f"ffn_act_fn {act!r} is not supported (only 'silu')")

    @property
    def rope(self) -> RopeConfig:
        """Rotary settings.

        ``attn_config.rope_theta`` is DBRX's own key and wins over a ``rope_theta`` in
        ``rope_parameters``: transformers 5 ignores the nested key and writes its default
        base (10000) there, which is not the base the model was trained with.
        """
        params = {**(self.rope_parameters or {}), "rope_theta": self.rope_theta}
        return rope_config_from(
            {"rope_parameters": params, "max_position_embeddings": self.max_seq_len}
        )


def _attention_config(args: ModelArgs) -> AttentionConfig:
    """The shared attention configured for DBRX (fused ``Wqkv``, ``out_proj``, clipping)."""
    return AttentionConfig(
        hidden_size=args.d_model,
        num_heads=args.n_heads,
        num_kv_heads=args.kv_n_heads,
        head_dim=args.d_model // args.n_heads,
        rope=args.rope,
        clip_qkv=args.clip_qkv,  # training stabiliser, see the module docstring
        names=AttentionNames(qkv="Wqkv", o="out_proj"),
    )


class NormAttnNorm(nn.Module):
    """``norm_1`` -> attention -> residual add -> ``norm_2``; returns both streams.

    The second norm belongs logically to the MoE that follows (it is that sub-block's
    pre-norm); DBRX's checkpoint keeps it here, so we do too.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(args.d_model, bias=False)
        self.attn = Attention(_attention_config(args))
        self.norm_2 = nn.LayerNorm(args.d_model, bias=False)

    def __call__(
        self, x: mx.array, mask: mx.array | str | None, cache: Any | None
    ) -> tuple[mx.array, mx.array]:
        """Attention sub-block plus the MoE's pre-norm.

        Args:
            x: Residual stream ``[B, L, M]``.
            mask: The cache view's mask (see ``models.cache.views``).
            cache: This layer's KV cache, or ``None``.

        Returns:
            The updated residual stream and its ``norm_2`` copy, both ``[B, L, M]``.
        """
        h = x + self.attn(self.norm_1(x), mask, cache)  # [B, L, M]
        return h, self.norm_2(h)


class SparseMoeBlock(nn.Module):
    """DBRX's MoE: softmax over all experts, top-k, optional p-norm renormalisation.

    The router's softmax runs over all E experts, the k most probable are kept, and their
    probabilities are divided by their p-norm when ``moe_normalize_expert_weights`` is set
    (p = 1, the released model, makes them sum to one). The k experts (stacked SwiGLU,
    ``w1``/``v1``/``w2`` as gate/up/down) run through one ``SwitchGLU`` for all tokens at
    once and their outputs are mixed with those weights.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.moe_top_k
        self.normalize_p = args.moe_normalize_expert_weights
        self.router = LinearRouter(args.d_model, args.moe_num_experts)
        self.switch_mlp = SwitchGLU(args.d_model, args.ffn_hidden_size, args.moe_num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        """Route and mix.

        Args:
            x: Normalised hidden states ``[B, L, M]``.

        Returns:
            ``[B, L, M]``.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, M]
        logits = self.router(x)  # [T, E]
        inds, weights = softmax_topk(logits, self.top_k, renormalize_p=self.normalize_p)
        y = combine_experts(self.switch_mlp(x, inds), weights)  # [T, A, M] -> [T, M]
        return y.reshape(shape)


class DecoderLayer(nn.Module):
    """One DBRX block: ``NormAttnNorm``, then the MoE on the normalised stream, added back."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.norm_attn_norm = NormAttnNorm(args)
        self.ffn = SparseMoeBlock(args)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Any | None) -> mx.array:
        """Apply the block.

        Args:
            x: ``[B, L, M]``.
            mask: The cache view's mask (see ``models.cache.views``).
            cache: This layer's KV cache, or ``None``.

        Returns:
            ``[B, L, M]``.
        """
        residual, normed = self.norm_attn_norm(x, mask, cache)
        return residual + self.ffn(normed)


class Model(CausalLM):
    """DBRX causal LM: the model protocol of ``models.base`` plus loading hooks.

    The inner model is ``models.base.DecoderStack`` under DBRX's names (``transformer.wte``,
    ``transformer.blocks``, the final bias-free LayerNorm ``transformer.norm_f``); the output
    head is never tied.
    """

    # `convert --quantize` keeps the router at higher precision: it is tiny, and every
    # token's choice of experts depends on it.
    router_bits = 8
    router_group_size = 64

    def __init__(self, args: ModelArgs) -> None:
        blocks = [DecoderLayer(args) for _ in range(args.n_layers)]
        norm = nn.LayerNorm(args.d_model, bias=False)
        names = StackNames(embedding="wte", layers="blocks", norm="norm_f")
        stack = DecoderStack(args.vocab_size, args.d_model, blocks, norm, names)
        super().__init__(args, stack, tied=False, stack_name="transformer")

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a publisher or mlx-lm checkpoint to our stacked ``ffn.switch_mlp`` names.

        * Publisher: ``ffn.experts.mlp.{w1,v1,w2}`` are each ``[E*F, M]``, experts
          concatenated along the rows. A reshape to ``[E, F, M]`` separates the experts
          without copying; ``w1``/``v1`` are then gate/up as ``[E, out=F, in=M]``, while
          ``w2`` is applied as ``x @ w2`` (transformers' ``matmul(expert_w2)``), so the
          down projection ``[E, M, F]`` is its transpose.
        * mlx-lm: one linear per expert, ``ffn.experts.{e}.{w1,v1,w2}.*`` (``w2`` already
          ``[M, F]``), float or quantized (``weight``/``scales``/``biases``); these are
          stacked with ``stack_experts``.
        * Already sanitized: no ``ffn.experts`` tensors remain, so nothing changes.

        Args:
            weights: Checkpoint tensors by name.

        Returns:
            Tensors under our parameter names.
        """
        E, F = self.args.moe_num_experts, self.args.ffn_hidden_size
        prefixes = [f"transformer.blocks.{i}.ffn" for i in range(self.args.n_layers)]
        for prefix in prefixes:
            for src, dst in _EXPERT_NAMES.items():
                fused = weights.pop(f"{prefix}.experts.mlp.{src}", None)  # [E*F, M]
                if fused is None:
                    continue
                w = fused.reshape(E, F, -1)  # [E, F, M]
                w = w.swapaxes(1, 2) if src == "w2" else w  # down: [E, M, F]
                weights[f"{prefix}.switch_mlp.{dst}.weight"] = w
        return stack_experts(weights, prefixes, E, _EXPERT_NAMES)

    @property
    def quant_overrides(self) -> tuple[QuantOverride, ...]:
        """Modules quantized at ``router_bits`` instead of the default (see the class)."""
        return (QuantOverride(("ffn.router.layer",), self.router_bits, self.router_group_size),)
