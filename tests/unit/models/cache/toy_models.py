"""Tiny models with one decoder layer per cache kind, built from moeserve's own layers.

The five families only use ``Full`` attention; these toys exercise the other kinds through
the real ``DecoderStack`` / ``CausalLM`` path before their families exist:

* ``"full"``: ``layers.attention.Attention`` (grouped-query).
* ``"sliding:W"``: the same attention with ``sliding_window=W`` and gpt-oss sinks switched on
  (random sink logits, so that they change the softmax).
* ``"latent"``: ``ToyLatentAttention``, an MLA-like layer caching a compressed ``c_kv`` and one
  shared rotary key, decompressed per head at every pass.
* ``"recurrent"``: ``ToyDeltaNet``, a gated delta-rule linear attention with a short causal
  convolution (Qwen3-Next's gated DeltaNet, without its output gate and norms).

Each toy layer is the smallest thing that uses its kind's view the way a real family will
(issue 15's families take these as their reference); none is any checkpoint's architecture
and none loads weights. ``solo_run`` and ``forward`` are the runs the tests compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moeserve.models import backend
from moeserve.models.base import CausalLM, DecoderStack
from moeserve.models.cache import CacheStore, Latent, Recurrent, StepCache
from moeserve.models.layers.attention import Attention, gqa_config
from moeserve.models.layers.decoder import PreNormDecoderLayer
from moeserve.models.layers.mlp import GatedMLP
from moeserve.models.layers.norm import RMSNorm
from moeserve.models.layers.rope import RoPE, RopeConfig

# Named layer plans. The sliding toy alternates windows below and above BLOCK (two sliding
# groups) with a full layer, as gpt-oss alternates; the hybrid is Qwen3-Next's recurrent-then-
# full pattern, shortened; "mixed" holds every kind (its full and latent layers share a group).
TOYS: dict[str, tuple[str, ...]] = {
    "full": ("full", "full"),
    "sliding": ("sliding:5", "full", "sliding:20"),
    "latent": ("latent", "latent"),
    "recurrent": ("recurrent", "recurrent"),
    "hybrid": ("recurrent", "recurrent", "full"),
    "mixed": ("full", "sliding:5", "latent", "recurrent"),
}


@dataclass(frozen=True)
class ToyArgs:
    """The shape of a toy model (the fields ``gqa_config`` reads, plus the layer plan)."""

    layers: tuple[str, ...]
    model_type: str = "toy"
    vocab_size: int = 64
    hidden_size: int = 32
    intermediate_size: int = 48
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 8
    rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=10000.0))


class ToyLatentAttention(nn.Module):
    """MLA-like attention: caches ``c_kv`` ``[B, 1, S, rank]`` and a shared rotary key.

    Queries are ``nope + rope_dim`` wide per head; keys are the per-head decompression of
    ``c_kv`` (``kv_b_proj``) followed by the one rotary key every head shares; values come out
    of the same decompression. What is cached is what DeepSeek caches:
    ``Latent(((1, rank), (1, rope_dim)))``. Values are as wide as keys here: DeepSeek-V3's
    are narrower (128 vs 192), which ``backend.cpu_attention``'s kernels do not take yet.
    """

    def __init__(self, args: ToyArgs, rank: int = 12, nope: int = 8, rope_dim: int = 4) -> None:
        super().__init__()
        M, H = args.hidden_size, args.num_attention_heads
        self.heads, self.rank, self.nope, self.rope_dim = H, rank, nope, rope_dim
        self.v_dim = nope + rope_dim  # see the class docstring
        self.q_proj = nn.Linear(M, H * (nope + rope_dim), bias=False)
        self.kv_a_proj = nn.Linear(M, rank + rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(rank)
        self.kv_b_proj = nn.Linear(rank, H * (nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, M, bias=False)
        self.rope = RoPE(rope_dim, args.rope)
        self.scale = (nope + rope_dim) ** -0.5

    def cache_kind(self) -> Latent:
        """Per position: the compressed ``c_kv`` and the shared rotary key."""
        return Latent(((1, self.rank), (1, self.rope_dim)))

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Any | None) -> mx.array:
        """Attend from ``x`` ``[B, L, M]`` to the cached latents plus its own.

        Args:
            x: Normalised hidden states.
            mask: The view's mask (``"causal"``/None for a stateless pass).
            cache: This layer's ``LayerView``, or None.

        Returns:
            ``[B, L, M]``.
        """
        B, L, _ = x.shape
        H, n, r = self.heads, self.nope, self.rope_dim
        q = self.q_proj(x).reshape(B, L, H, n + r).transpose(0, 2, 1, 3)  # [B, H, L, n+r]
        q_nope, q_pe = q[..., :n], q[..., n:]
        c_kv, k_pe = mx.split(self.kv_a_proj(x), [self.rank], axis=-1)
        c_kv = self.kv_a_norm(c_kv)[:, None]  # [B, 1, L, rank]: one "head" per latent
        k_pe = k_pe[:, None]  # [B, 1, L, r]
        offset = cache.rope_offset if cache is not None else 0
        q_pe, k_pe = self.rope(q_pe, offset), self.rope(k_pe, offset)
        if cache is not None:
            c_kv, k_pe = cache.update_and_fetch(c_kv, k_pe)  # [B, 1, S, *]
        S = c_kv.shape[2]
        kv = self.kv_b_proj(c_kv[:, 0]).reshape(B, S, H, n + self.v_dim).transpose(0, 2, 1, 3)
        k_nope, v = kv[..., :n], kv[..., n:]  # [B, H, S, n], [B, H, S, v_dim]
        k = mx.concatenate([k_nope, mx.broadcast_to(k_pe, (B, H, S, r))], axis=-1)
        q = mx.concatenate([q_nope, q_pe], axis=-1)
        out = backend.sdpa(q, k, v, scale=self.scale, mask=mask)  # [B, H, L, v_dim]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class ToyDeltaNet(nn.Module):
    """Gated delta-rule linear attention over a short causal convolution (one state per row).

    The state is what Qwen3-Next's gated DeltaNet keeps: the last ``conv - 1`` inputs of the
    depthwise causal convolution, ``[conv - 1, C]``, and one ``[key_dim, value_dim]`` matrix
    per head. Per token: ``S = decay * S``, then the delta rule
    ``S += k (beta (v - S^T k))^T``, and the output ``S^T q``. A prefill chunk (L > 1) runs
    the same loop over its tokens, so chunked, batched and stateless runs compute alike.
    """

    def __init__(self, args: ToyArgs, heads: int = 2, key_dim: int = 8, conv: int = 4) -> None:
        super().__init__()
        M = args.hidden_size
        self.heads, self.key_dim, self.value_dim, self.conv = heads, key_dim, args.head_dim, conv
        self.channels = heads * (2 * key_dim + self.value_dim)  # C: q, k, v
        self.qkv_proj = nn.Linear(M, self.channels, bias=False)
        self.conv_weight = mx.random.normal((conv, self.channels)) * 0.5  # depthwise taps
        self.decay_proj = nn.Linear(M, heads)
        self.beta_proj = nn.Linear(M, heads)
        self.o_proj = nn.Linear(heads * self.value_dim, M, bias=False)

    def cache_kind(self) -> Recurrent:
        """The convolution tail and the per-head matrix state."""
        return Recurrent(
            ((self.conv - 1, self.channels), (self.heads, self.key_dim, self.value_dim))
        )

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Any | None) -> mx.array:
        """Run the recurrence over ``x`` ``[B, L, M]`` from the cached (or a zero) state.

        Args:
            x: Normalised hidden states.
            mask: Ignored: a recurrence is causal by construction.
            cache: This layer's ``LayerView`` (reads and assigns ``state``), or None.

        Returns:
            ``[B, L, M]``.
        """
        B, L, _ = x.shape
        H, Dk, Dv, K = self.heads, self.key_dim, self.value_dim, self.conv
        if cache is None:
            tail = mx.zeros((B, K - 1, self.channels), x.dtype)
            state = mx.zeros((B, H, Dk, Dv), x.dtype)
        else:
            tail, state = cache.state
        padded = mx.concatenate([tail, self.qkv_proj(x)], axis=1)  # [B, K-1+L, C]
        mixed = sum(padded[:, j : j + L] * self.conv_weight[j] for j in range(K))  # causal
        mixed = nn.silu(mixed)
        q, k, v = mx.split(mixed, [H * Dk, 2 * H * Dk], axis=-1)
        q = _l2norm(q.reshape(B, L, H, Dk)) * Dk**-0.5
        k = _l2norm(k.reshape(B, L, H, Dk))
        v = v.reshape(B, L, H, Dv)
        # Decay near 1 (about 0.97 a token): the state must remember tens of tokens, or a
        # test comparing cached with uncached runs would pass with a wrong state.
        decay = mx.exp(-0.05 * nn.softplus(self.decay_proj(x)))  # [B, L, H], in (0, 1)
        beta = mx.sigmoid(self.beta_proj(x))  # [B, L, H]
        outs = []
        for t in range(L):
            state = state * decay[:, t, :, None, None]
            kt = k[:, t, :, :, None]  # [B, H, Dk, 1]
            delta = (v[:, t] - (state * kt).sum(axis=2)) * beta[:, t, :, None]  # [B, H, Dv]
            state = state + kt * delta[:, :, None, :]
            outs.append((state * q[:, t, :, :, None]).sum(axis=2))  # [B, H, Dv]
        if cache is not None:
            cache.state = [padded[:, L:], state]  # the last K-1 inputs, the matrices
        return self.o_proj(mx.stack(outs, axis=1).reshape(B, L, H * Dv))


def _l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """``x`` divided by its L2 norm over the last axis."""
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def _mixer(kind: str, args: ToyArgs) -> nn.Module:
    """The token mixer of one layer plan entry (``"sliding:5"`` etc.)."""
    if kind == "full":
        return Attention(gqa_config(args))
    if kind.startswith("sliding:"):
        window = int(kind.split(":")[1])
        return Attention(gqa_config(args, sliding_window=window, sinks=True))
    if kind == "latent":
        return ToyLatentAttention(args)
    if kind == "recurrent":
        return ToyDeltaNet(args)
    raise ValueError(f"unknown toy layer {kind!r}")


class ToyModel(CausalLM):
    """A ``CausalLM`` whose decoder layers follow ``args.layers`` (pre-norm, dense MLP)."""

    def __init__(self, args: ToyArgs) -> None:
        M = args.hidden_size
        layers = [
            PreNormDecoderLayer(_mixer(kind, args), GatedMLP(M, args.intermediate_size), M, 1e-6)
            for kind in args.layers
        ]
        super().__init__(args, DecoderStack(args.vocab_size, M, layers, RMSNorm(M)), tied=False)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Nothing to rename: toys load no checkpoint."""
        return weights


def toy(name: str, seed: int = 0) -> ToyModel:
    """The named toy (``TOYS``), float32, seeded, with random attention sinks, evaluated.

    Args:
        name: A key of ``TOYS``.
        seed: Seed of the weights.

    Returns:
        The model.
    """
    mx.random.seed(seed)
    model = ToyModel(ToyArgs(TOYS[name]))
    for layer in model.layers:
        attention = layer["self_attn"]
        if isinstance(attention, Attention) and attention.cfg.sinks:
            # Zero sinks would still join every softmax; large random ones change it a lot.
            attention.sinks = mx.random.normal((attention.cfg.num_heads,)) * 2.0
    mx.eval(model.parameters())
    return model


def forward(model: CausalLM, store: CacheStore, seq_ids: list[str], tokens: Any) -> mx.array:
    """One pass of ``tokens`` ``[B, L]`` over rows ``seq_ids`` of ``store``, evaluated.

    Args:
        model: The model.
        store: Holds the rows.
        seq_ids: The rows, in batch order.
        tokens: ``[B, L]`` token ids (anything ``np.asarray`` takes).

    Returns:
        Logits ``[B, L, V]``.
    """
    tokens = np.asarray(tokens, dtype=np.int32).reshape(len(seq_ids), -1)
    step = StepCache(store, seq_ids, tokens.shape[1])
    logits = model(mx.array(tokens), cache=step)
    mx.eval(logits, step.arrays())  # the pools too: their graphs would grow step by step
    return logits


def new_store(model: CausalLM) -> CacheStore:
    """An empty store for ``model``'s layout, in its cache dtype."""
    return CacheStore(model.cache_layout(), model.cache_dtype())


def solo_run(model: CausalLM, prompt: list[int], decoded: list[int]) -> list[mx.array]:
    """A row alone in its own store: the prompt in one pass, then one token per pass.

    Args:
        model: The model.
        prompt: Prompt tokens.
        decoded: Tokens fed one at a time after the prompt.

    Returns:
        ``[V]`` logits: the prompt's last position, then one per decoded token.
    """
    store = new_store(model)
    store.add("solo")
    out = [forward(model, store, ["solo"], [prompt])[0, -1]]
    out += [forward(model, store, ["solo"], [[t]])[0, -1] for t in decoded]
    return out


def close(a: mx.array, b: mx.array, atol: float = 1e-5) -> bool:
    """Whether two logits arrays agree within ``atol`` (float32 reorderings differ ~1e-7)."""
    return bool(mx.allclose(a, b, rtol=0, atol=atol).item())
