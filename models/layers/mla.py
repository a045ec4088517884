"""Multi-head latent attention (MLA), written once for DeepSeek-V3, Kimi-K2 and GLM-4.7-Flash.

MLA (DeepSeek-V2, arXiv:2405.04434, section 2.1; kept in DeepSeek-V3, arXiv:2412.19437)
caches a low-rank latent instead of per-head keys and values. For each token x:

* queries: ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj`` (or one ``q_proj`` when
  ``q_lora_rank`` is null), H heads of N "nope" channels (no position) and P rotary channels;
* ``kv_a_proj_with_mqa`` -> the latent ``c_kv`` (R channels, then ``kv_a_layernorm``) and one
  rotary key ``k_pe`` (P channels) that every head shares;
* per head h, key ``[W_k[h] c_kv, k_pe]`` and value ``W_v[h] c_kv``, where ``kv_b_proj``
  stacks the ``W_k[h]`` (N x R) and ``W_v[h]`` (V x R) of every head.

The cache holds what the paper caches, the normalised ``c_kv`` and the rotated ``k_pe``:
``Latent(((1, R), (1, P)))``, R + P numbers a token per layer (576 in DeepSeek-V3, against
2 x 128 x 192 for its 128 decompressed heads).

How attention runs: the absorbed form, always. Since ``q . (W_k c) = (W_k^T q) . c`` and
``sum_j p_j W_v c_j = W_v sum_j p_j c_j``, each query head is folded into latent space
(``embed_q``: ``W_k[h]^T``), attention runs over the cached ``[c_kv, k_pe]`` as one shared
key/value head (keys R + P wide, values R wide), and each head's result is unfolded by
``unembed_out`` (``W_v[h]``). This is exact algebra (only float summation order differs from
decompressing, ``tests/unit/models/test_mla.py``), and decoding never decompresses the
cache: a decode step costs O(H S (R + P)) instead of the O(S R H (N + V)) that expanding
every cached position through ``kv_b_proj`` costs at every step. The parameters are
mlx-lm's: ``embed_q`` ``[H, R, N]`` and ``unembed_out`` ``[H, V, R]``, split from the
publisher's ``kv_b_proj`` by ``split_kv_b_proj`` at load.

RoPE: the rotary channels are interleaved pairs (``rope_interleave``, DeepSeek's layout;
transformers rotates ``(x0, x1), (x2, x3), ...`` and writes the halves out de-interleaved);
they are de-interleaved here and rotated as halves (``layers/rope.py``), which is the same
arithmetic. YaRN (DeepSeek-V3's ``rope_scaling``) also scales the softmax: see
``softmax_scale``.

This module does not know: checkpoint names outside the attention block, MoE, or how the
cache stores its tensors (``models/cache``).

Shape legend: B = batch, L = new tokens, S = cached + new tokens, M = hidden size,
H = heads, N = qk_nope_head_dim, P = qk_rope_head_dim, R = kv_lora_rank, V = v_head_dim,
Q = q_lora_rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import backend
from moeserve.models.cache import Latent
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.layers.rope import RoPE, RopeConfig

# Epsilon of q_a_layernorm and kv_a_layernorm. transformers builds both with its RMSNorm
# default (1e-6) whatever rms_norm_eps says, for GLM-4.7-Flash too (whose rms_norm_eps is
# 1e-5; mlx-lm and vLLM use rms_norm_eps there). The parity reference decides: 1e-6.
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLAConfig:
    """Everything the latent attention of our MLA families needs."""

    hidden_size: int  # M
    num_heads: int  # H
    kv_lora_rank: int  # R, width of the cached latent c_kv
    qk_nope_head_dim: int  # N, per-head query/key channels that carry no position
    qk_rope_head_dim: int  # P, per-head query channels (and the shared key) that rotate
    v_head_dim: int  # V, per-head value width
    rope: RopeConfig  # rotary settings (YaRN in DeepSeek-V3 and Kimi-K2)
    q_lora_rank: int | None = None  # Q, low-rank query bottleneck; None = one q_proj
    rope_interleave: bool = True  # rotary channels stored as interleaved pairs
    attention_bias: bool = False  # biases on q_a_proj, kv_a_proj_with_mqa and o_proj


def mla_config(args: Any) -> MLAConfig:
    """The attention of a DeepSeek-V3-style ``ModelArgs`` (its config keys are MLA's names).

    Args:
        args: A ``ModelArgs`` with the MLA fields, ``rope`` and ``rope_interleave``.

    Returns:
        The configuration.
    """
    return MLAConfig(
        hidden_size=args.hidden_size,
        num_heads=args.num_attention_heads,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        rope=args.rope,
        q_lora_rank=args.q_lora_rank,
        rope_interleave=args.rope_interleave,
        attention_bias=args.attention_bias,
    )


def softmax_scale(cfg: MLAConfig) -> float:
    """The attention logits' multiplier: ``(N + P) ** -0.5``, times YaRN's ``mscale`` squared.

    DeepSeek's YaRN rule (transformers' ``yarn_apply_mscale``): with a scaled rotary type and
    a non-zero ``mscale_all_dim``, ``m = 0.1 * mscale_all_dim * ln(factor) + 1`` (1 when
    ``factor <= 1``) multiplies the scale twice, once for queries and once for keys. It is
    separate from the rotary ``attention_factor`` (``mscale / mscale_all_dim``), which
    ``RoPE`` applies to the rotated channels.

    Args:
        cfg: The attention configuration.

    Returns:
        The scale.
    """
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    s = cfg.rope.scaling or {}
    if cfg.rope.rope_type != "default" and s.get("mscale_all_dim"):
        factor = float(s["factor"])
        m = 0.1 * float(s["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= m * m
    return scale


class MultiLinear(nn.Module):
    """One bias-free linear map per head: ``weight`` ``[H, out, in]``, ``y[h] = x[h] W[h]^T``.

    Shapes: ``x`` ``[..., H, L, in]`` -> ``[..., H, L, out]``.
    """

    def __init__(self, input_dims: int, output_dims: int, num_heads: int) -> None:
        super().__init__()
        bound = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(-bound, bound, (num_heads, output_dims, input_dims))

    def __call__(self, x: mx.array) -> mx.array:
        """Apply each head's matrix to that head's rows.

        Args:
            x: ``[..., H, L, in]``.

        Returns:
            ``[..., H, L, out]``.
        """
        return x @ self["weight"].swapaxes(-1, -2)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        """Quantized copy (called by ``nn.quantize``); groups run along ``in``.

        Args:
            group_size: Elements per quantization group.
            bits: Bits per weight.
            mode: MLX quantization mode.

        Returns:
            A ``QuantizedMultiLinear``.
        """
        H, out, inp = self.weight.shape
        q = QuantizedMultiLinear(inp, out, H, group_size, bits, mode)
        q.weight, q.scales, *rest = mx.quantize(self.weight, group_size, bits, mode=mode)
        q.biases = rest[0] if rest else None
        return q


class QuantizedMultiLinear(nn.Module):
    """``MultiLinear`` with quantized per-head matrices (``weight``/``scales``/``biases``)."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_heads: int,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ) -> None:
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((num_heads, output_dims, input_dims))
        self.weight, self.scales, *rest = mx.quantize(w, group_size, bits, mode=mode)
        self.biases = rest[0] if rest else None
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        """Same contract as ``MultiLinear.__call__``."""
        return mx.quantized_matmul(
            x,
            self["weight"],
            scales=self["scales"],
            biases=self.get("biases"),
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )


def _deinterleave(x: mx.array) -> mx.array:
    """``[..., P]`` pairs ``(x0, x1), (x2, x3), ...`` -> ``[x0, x2, ..., x1, x3, ...]``."""
    *lead, P = x.shape
    return x.reshape(*lead, P // 2, 2).swapaxes(-1, -2).reshape(*lead, P)


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA over a latent cache, in the absorbed form (see the module docstring)."""

    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        M, H, R = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank
        N, P, V = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(M, H * (N + P), bias=False)
        else:
            self.q_a_proj = nn.Linear(M, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (N + P), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(M, R + P, bias=bias)
        self.kv_a_layernorm = RMSNorm(R, eps=LATENT_NORM_EPS)
        self.embed_q = MultiLinear(N, R, H)  # W_k[h]^T: a query's nope part into latent space
        self.unembed_out = MultiLinear(R, V, H)  # W_v[h]: a latent result into values
        self.o_proj = nn.Linear(H * V, M, bias=bias)
        self.rope = RoPE(P, cfg.rope)
        self.scale = softmax_scale(cfg)

    def cache_kind(self) -> Latent:
        """Per position: the normalised latent ``c_kv`` and the rotated shared key ``k_pe``."""
        return Latent(((1, self.cfg.kv_lora_rank), (1, self.cfg.qk_rope_head_dim)))

    def _queries(self, x: mx.array) -> mx.array:
        """``[B, L, H * (N + P)]``, through the low-rank bottleneck when there is one."""
        if self.cfg.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _rotate(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """Rotary embedding of the P rotary channels (interleaved pairs when so stored)."""
        return self.rope(_deinterleave(x) if self.cfg.rope_interleave else x, offset)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Any | None) -> mx.array:
        """Attend from ``x`` ``[B, L, M]`` to the cached latents plus its own.

        Args:
            x: Normalised hidden states.
            mask: The cache view's mask (``"causal"``/None for a stateless pass).
            cache: This layer's cache view (``models.cache``), or None.

        Returns:
            ``[B, L, M]``.
        """
        c = self.cfg
        B, L, _ = x.shape
        H, N, R = c.num_heads, c.qk_nope_head_dim, c.kv_lora_rank
        q = self._queries(x).reshape(B, L, H, -1).transpose(0, 2, 1, 3)  # [B, H, L, N+P]
        q_nope, q_pe = q[..., :N], q[..., N:]
        c_kv, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [R], axis=-1)  # [B, L, R], [B, L, P]
        c_kv = self.kv_a_layernorm(c_kv)[:, None]  # [B, 1, L, R]: one head shared by all
        offset = cache.rope_offset if cache is not None else 0
        q_pe = self._rotate(q_pe, offset)  # [B, H, L, P]
        k_pe = self._rotate(k_pe[:, None], offset)  # [B, 1, L, P]
        if cache is not None:
            c_kv, k_pe = cache.update_and_fetch(c_kv, k_pe)  # [B, 1, S, R], [B, 1, S, P]
        queries = mx.concatenate([self.embed_q(q_nope), q_pe], axis=-1)  # [B, H, L, R+P]
        keys = mx.concatenate([c_kv, k_pe], axis=-1)  # [B, 1, S, R+P]
        out = backend.sdpa(queries, keys, c_kv, scale=self.scale, mask=mask)  # [B, H, L, R]
        out = self.unembed_out(out)  # [B, H, L, V]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def split_kv_b_proj(weights: dict[str, mx.array], prefix: str, cfg: MLAConfig) -> None:
    """Replace ``{prefix}.kv_b_proj.*`` by ``embed_q`` and ``unembed_out``, in place.

    ``kv_b_proj.weight`` ``[H * (N + V), R]`` holds, per head, N key rows then V value rows.
    ``embed_q`` takes the key rows transposed (``[H, R, N]``), ``unembed_out`` the value rows
    (``[H, V, R]``), as mlx-lm's layout has them. Float tensors split exactly. A quantized
    ``kv_b_proj`` (MLX conversions made before mlx-lm split it) is dequantized, split and
    quantized again at its own bits and group size, as mlx-lm loads it; a part whose input
    width the group size does not divide stays float. Checkpoints without ``kv_b_proj`` (the
    MLX layout) pass untouched.

    Args:
        weights: Checkpoint tensors, modified in place.
        prefix: The attention module's name, e.g. ``model.layers.3.self_attn``.
        cfg: The attention configuration.
    """
    name = f"{prefix}.kv_b_proj"
    if f"{name}.weight" not in weights:
        return
    w = weights.pop(f"{name}.weight")
    quant = None
    if f"{name}.scales" in weights:
        scales, biases = weights.pop(f"{name}.scales"), weights.pop(f"{name}.biases", None)
        R = cfg.kv_lora_rank
        quant = {"bits": 32 * w.shape[-1] // R, "group_size": R // scales.shape[-1]}
        w = mx.dequantize(w, scales, biases, **quant)
    H, N = cfg.num_heads, cfg.qk_nope_head_dim
    w = w.reshape(H, N + cfg.v_head_dim, -1)  # [H, N + V, R]
    parts = {"embed_q": w[:, :N].swapaxes(-1, -2), "unembed_out": w[:, N:]}
    for part, value in parts.items():
        value = mx.contiguous(value)
        if quant is not None and value.shape[-1] % quant["group_size"] == 0:
            packed, scales, biases = mx.quantize(value, **quant)
            weights[f"{prefix}.{part}.scales"] = scales
            weights[f"{prefix}.{part}.biases"] = biases
            value = packed
        weights[f"{prefix}.{part}.weight"] = value
