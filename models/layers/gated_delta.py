"""The gated DeltaNet token mixer of Qwen3-Next and Qwen3.5: linear attention with a matrix state.

Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", arXiv:2412.06464) replaces softmax attention by a recurrence over one
``[Dk, Dv]`` matrix per value head. For each token, with its query q, key k, value v, decay
``gamma = exp(g)`` in (0, 1] and write strength ``beta`` in (0, 1):

1. ``S = gamma * S``                      forget a little of everything (the "gated" part);
2. ``u = beta * (v - S^T k)``             what S would have read at k, corrected towards v;
3. ``S = S + k u^T``                      write the correction (the delta rule);
4. ``o = S^T q``                          read the state at the query.

The layer around it, as transformers' ``Qwen3NextGatedDeltaNet`` computes it: projections give
q, k (``Hk`` heads of ``Dk``), v and an output gate z (``Hv`` heads of ``Dv``; each key head
serves ``Hv / Hk`` consecutive value heads) and per value head the logits b and a; q, k and v
go through a short causal depthwise convolution (kernel ``K``, 4 in every release) and a SiLU;
q and k are L2-normalised and q is scaled by ``1 / sqrt(Dk)``; ``beta = sigmoid(b)`` and
``g = -exp(A_log) * softplus(a + dt_bias)``; the outputs are RMS-normalised per head, times
``silu(z)`` (``GatedRMSNorm``), and projected back to the hidden size.

How the recurrence runs (``delta_rule``): chunked, exactly. A prompt of L tokens is cut into
chunks of C tokens; within a chunk the delta-rule writes form a unit lower-triangular linear
system (the "UT transform" of DeltaNet, Yang et al. 2024, arXiv:2406.06484), which is inverted
for every chunk at once by recursive block halving (log2 C batched matmuls, no per-token
loop), so that the only sequential loop is over the L / C chunks. It is the same algebra as
transformers' ``torch_chunk_gated_delta_rule``, so results agree with the token-by-token
recurrence up to float32 rounding. A decode step is the same code with C = 1 (nothing to
invert, one chunk), so prefill and decode share one code path.

State (``cache_kind``): ``Recurrent(((K - 1, conv_dim), (Hv, Dk, Dv)))``: the convolution's
last ``K - 1`` inputs and the matrices. A cache view's ``state`` is read at the start of a
call and assigned at its end; without a cache the call starts from zeros. The recurrence
runs in float32 whatever the model dtype; the state is stored in the cache's dtype.

This file does not do: padded rows (every call's rows are unpadded: one row per prefill
chunk, one token per row when decoding), variable-length packing, or a Metal kernel.

Shape legend: B = batch, L = new tokens, M = hidden size, Hk / Hv = key / value heads,
Dk / Dv = their widths, C = chunk length, N = chunks, K = convolution kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import backend
from moeserve.models.cache import Recurrent

F32 = mx.float32


@dataclass(frozen=True)
class GatedDeltaConfig:
    """The shape of one gated DeltaNet layer."""

    hidden_size: int  # M
    num_k_heads: int  # Hk, query/key heads
    num_v_heads: int  # Hv, value heads = state matrices; a multiple of Hk
    head_k_dim: int  # Dk
    head_v_dim: int  # Dv
    conv_kernel: int = 4  # K, taps of the causal depthwise convolution
    norm_eps: float = 1e-6  # epsilon of the gated output RMSNorm
    # C for long inputs, a power of two (see ``delta_rule``). 32: on the CPU, a 512-token
    # chunk of Qwen3-Next's shape ran the rule in ~0.2 s at C = 16 or 32 and 0.4-1.1 s at 64
    # (the per-chunk C x C work grows with C, the loop over chunks with L / C).
    chunk_size: int = 32

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two, got {self.chunk_size}")

    @property
    def key_dim(self) -> int:
        """Hk * Dk, the width of all queries (and of all keys)."""
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        """Hv * Dv, the width of all values (and of the output gate)."""
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: queries, keys and values side by side."""
        return 2 * self.key_dim + self.value_dim


def _unit_lower_inverse(a: mx.array) -> mx.array:
    """``(I + a)^-1`` for strictly lower-triangular ``a`` ``[..., C, C]``, C a power of two.

    Recursive block halving: the inverse of ``[[X, 0], [A21, Y]]`` (X, Y unit lower) is
    ``[[X^-1, 0], [-Y^-1 A21 X^-1, Y^-1]]``. Starting from the 1x1 diagonal blocks (all ones),
    each round pairs neighbouring blocks, so log2(C) rounds of batched matmuls invert every
    chunk of every head together. This is the blocked form of forward substitution, not a
    power series, so nothing large cancels.
    """
    *lead, C, _ = a.shape
    inv = mx.ones((*lead, C, 1, 1), dtype=a.dtype)  # the inverted 1x1 diagonal blocks
    size = 1
    while size < C:
        n = C // (2 * size)
        blocks = a.reshape(*lead, n, 2 * size, n, 2 * size)
        diag = mx.moveaxis(mx.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., n, 2s, 2s]
        lower = diag[..., size:, :size]  # A21 of each pair, [..., n, s, s]
        x, y = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        top = mx.concatenate([x, mx.zeros_like(x)], axis=-1)
        bottom = mx.concatenate([-(y @ lower @ x), y], axis=-1)
        inv = mx.concatenate([top, bottom], axis=-2)  # [..., n, 2s, 2s]
        size *= 2
    return inv.reshape(*lead, C, C)


def _chunks(x: mx.array, n: int, c: int) -> mx.array:
    """``[B, N*C, H, ...]`` -> ``[B, H, N, C, ...]``."""
    b, _, h, *rest = x.shape
    return mx.moveaxis(x, 1, 2).reshape(b, h, n, c, *rest)


def delta_rule(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    chunk_size: int = 32,
) -> tuple[mx.array, mx.array]:
    """Run the gated delta rule over L tokens from ``state``, chunk by chunk (float32).

    Within a chunk (positions t, j from its start; ``G_t`` the running sum of g, so
    ``Gamma_t = exp(G_t)`` is the decay since the chunk began) the recurrence unrolls to

    * ``S_t = Gamma_t S_0 + sum_{j<=t} (Gamma_t / Gamma_j) k_j u_j^T``,
    * ``u_t + sum_{j<t} beta_t (Gamma_t / Gamma_j) (k_t . k_j) u_j
      = beta_t v_t - beta_t Gamma_t S_0^T k_t``: a unit lower-triangular system ``(I + A) U``,
      solved with ``T = (I + A)^-1`` as ``U = T (beta V) - T (beta Gamma K) S_0``,
    * ``o_t = Gamma_t S_0^T q_t + sum_{j<=t} (Gamma_t / Gamma_j) (q_t . k_j) u_j``,
    * ``S_C = Gamma_C S_0 + sum_j (Gamma_C / Gamma_j) k_j u_j^T``.

    Everything but the terms in ``S_0`` is computed for all chunks at once; a loop over the
    chunks then carries the state. Inputs are zero-padded to whole chunks (zero keys and
    beta write nothing, zero g decays nothing, so the padding leaves the state alone).
    C is ``chunk_size``, or the smallest power of two >= L when L is shorter (1 when decoding).

    Args:
        q: Queries ``[B, L, H, Dk]``, L2-normalised and scaled (H = value heads).
        k: Keys ``[B, L, H, Dk]``, L2-normalised.
        v: Values ``[B, L, H, Dv]``.
        g: Log decays ``[B, L, H]`` (<= 0).
        beta: Write strengths ``[B, L, H]``.
        state: ``[B, H, Dk, Dv]`` before the first token.
        chunk_size: C for long inputs, a power of two.

    Returns:
        Outputs ``[B, L, H, Dv]`` and the state after the last token, float32.
    """
    B, L, H, _ = k.shape
    Dv = v.shape[-1]
    C = min(chunk_size, 1 << (L - 1).bit_length())
    N = -(-L // C)
    q, k, v, g, beta = (t.astype(F32) for t in (q, k, v, g, beta))
    if N * C > L:
        pad = [(0, 0), (0, N * C - L)]
        q, k, v = (mx.pad(t, [*pad, (0, 0), (0, 0)]) for t in (q, k, v))
        g, beta = (mx.pad(t, [*pad, (0, 0)]) for t in (g, beta))
    q, k, v = (_chunks(t, N, C) for t in (q, k, v))  # [B, H, N, C, D]
    g, beta = (_chunks(t, N, C) for t in (g, beta))  # [B, H, N, C]
    G = mx.cumsum(g, axis=-1)  # log Gamma, [B, H, N, C]
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    # Gamma_t / Gamma_j for j <= t, 0 above the diagonal (exp of -inf there: no overflow).
    ratio = mx.exp(mx.where(causal, G[..., :, None] - G[..., None, :], -mx.inf))  # [.., C, C]
    kb = k * beta[..., None]
    strict = mx.tril(causal, k=-1)
    a = mx.where(strict, (kb @ k.swapaxes(-1, -2)) * ratio, 0.0)  # A, [B, H, N, C, C]
    t_inv = _unit_lower_inverse(a)  # [B, H, N, C, C]
    gamma = mx.exp(G)[..., None]  # [B, H, N, C, 1]
    u_own = t_inv @ (v * beta[..., None])  # U without the S_0 term, [B, H, N, C, Dv]
    u_state = t_inv @ (kb * gamma)  # U's S_0 coefficient, [B, H, N, C, Dk]
    qk = (q @ k.swapaxes(-1, -2)) * ratio  # [B, H, N, C, C]
    q_state = q * gamma  # reads S_0, [B, H, N, C, Dk]
    k_end = k * mx.exp(G[..., -1:] - G)[..., None]  # writes S_C, [B, H, N, C, Dk]
    decay_end = mx.exp(G[..., -1])[..., None, None]  # Gamma_C, [B, H, N, 1, 1]
    state = state.astype(F32)
    outs = []
    for n in range(N):
        u = u_own[:, :, n] - u_state[:, :, n] @ state  # [B, H, C, Dv]
        outs.append(q_state[:, :, n] @ state + qk[:, :, n] @ u)
        state = state * decay_end[:, :, n] + k_end[:, :, n].swapaxes(-1, -2) @ u
    out = mx.stack(outs, axis=2).reshape(B, H, N * C, Dv)[:, :, :L]
    return out.transpose(0, 2, 1, 3), state


def l2_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    """``x / sqrt(sum(x^2) + eps)`` over the last axis (the reference's epsilon placement)."""
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


class CausalConv1d(nn.Module):
    """Depthwise causal convolution with K taps per channel (checkpoint name ``conv1d``).

    The weight is ``[C, K, 1]``, MLX's ``Conv1d`` layout (the publisher's is ``[C, 1, K]``;
    the model's ``sanitize`` moves the axis). Output position t mixes inputs t-K+1..t of its
    channel, reaching into the previous call's last K-1 inputs (the cached tail).
    """

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        scale = kernel**-0.5  # nn.Conv1d's initial range for one input channel per group
        self.weight = mx.random.uniform(-scale, scale, (channels, kernel, 1))

    def __call__(self, x: mx.array, tail: mx.array) -> tuple[mx.array, mx.array]:
        """Convolve ``x`` ``[B, L, C]`` after ``tail`` ``[B, K-1, C]``, then SiLU.

        Returns:
            The activations ``[B, L, C]`` and the new tail (the last K-1 inputs).
        """
        K, L = self["weight"].shape[1], x.shape[1]
        padded = mx.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, K-1+L, C]
        taps = self["weight"][..., 0].T  # [K, C]
        mixed = sum(padded[:, j : j + L] * taps[j] for j in range(K))
        return nn.silu(mixed), padded[:, L:]


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output times ``silu(gate)`` (plain weight, not zero-centred)."""

    def __init__(self, dims: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        """``rms_norm(x) * weight * silu(gate)`` over the last axis, gated in float32."""
        normed = backend.rms_norm(x, self["weight"], self.eps)
        return (normed.astype(F32) * nn.silu(gate.astype(F32))).astype(x.dtype)


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's gated DeltaNet layer (``linear_attn``), called like attention.

    Projections (Qwen3-Next's fused pair; ``project`` is what a family with other projections
    overrides): ``in_proj_qkvz`` gives, per key head, its query, its key, then the values and
    the output gates of the ``Hv / Hk`` value heads it serves; ``in_proj_ba`` gives, per key
    head, the b then the a logits of those value heads.
    """

    def __init__(self, cfg: GatedDeltaConfig) -> None:
        super().__init__()
        if cfg.num_v_heads % cfg.num_k_heads:
            raise ValueError(f"{cfg.num_v_heads} value heads do not group {cfg.num_k_heads} keys")
        self.cfg = cfg
        self.make_projections()
        self.conv1d = CausalConv1d(cfg.conv_dim, cfg.conv_kernel)
        self.dt_bias = mx.ones((cfg.num_v_heads,))
        self.A_log = mx.zeros((cfg.num_v_heads,))
        self.norm = GatedRMSNorm(cfg.head_v_dim, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.value_dim, cfg.hidden_size, bias=False)

    def make_projections(self) -> None:
        """The input projections (Qwen3-Next: ``in_proj_qkvz`` and ``in_proj_ba``)."""
        c = self.cfg
        self.in_proj_qkvz = nn.Linear(c.hidden_size, 2 * c.key_dim + 2 * c.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(c.hidden_size, 2 * c.num_v_heads, bias=False)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """Split the projections into what the rest of the layer takes.

        Args:
            x: ``[B, L, M]``.

        Returns:
            The convolution input ``[B, L, conv_dim]`` (all queries, all keys, all values),
            z ``[B, L, Hv, Dv]``, b and a ``[B, L, Hv]``: the per-key-head interleaving of
            the fused projections undone.
        """
        c = self.cfg
        B, L, _ = x.shape
        r = c.num_v_heads // c.num_k_heads  # value heads per key head
        qkvz = self.in_proj_qkvz(x).reshape(B, L, c.num_k_heads, -1)
        sizes = [c.head_k_dim, 2 * c.head_k_dim, 2 * c.head_k_dim + r * c.head_v_dim]
        q, k, v, z = mx.split(qkvz, sizes, axis=-1)  # per key head
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, c.num_k_heads, 2 * r), [r], axis=-1)
        mixed = mx.concatenate([t.reshape(B, L, -1) for t in (q, k, v)], axis=-1)
        heads = (B, L, c.num_v_heads)
        return mixed, z.reshape(*heads, c.head_v_dim), b.reshape(heads), a.reshape(heads)

    def cache_kind(self) -> Recurrent:
        """The convolution tail ``[K-1, conv_dim]`` and the matrices ``[Hv, Dk, Dv]``."""
        c = self.cfg
        return Recurrent(
            ((c.conv_kernel - 1, c.conv_dim), (c.num_v_heads, c.head_k_dim, c.head_v_dim))
        )

    def __call__(self, x: mx.array, mask: Any, cache: Any | None) -> mx.array:
        """Mix ``x`` ``[B, L, M]`` through the recurrence, from the cached (or a zero) state.

        Args:
            x: Normalised hidden states.
            mask: Ignored: the recurrence is causal by construction and rows are unpadded.
            cache: This layer's cache view (reads and assigns ``state``), or None.

        Returns:
            ``[B, L, M]``.
        """
        c = self.cfg
        B, L, _ = x.shape
        mixed, z, b, a = self.project(x)
        if cache is None:
            tail = mx.zeros((B, c.conv_kernel - 1, c.conv_dim), dtype=x.dtype)
            state = mx.zeros((B, c.num_v_heads, c.head_k_dim, c.head_v_dim), dtype=F32)
        else:
            tail, state = cache.state
        mixed, new_tail = self.conv1d(mixed, tail)
        q, k, v = mx.split(mixed, [c.key_dim, 2 * c.key_dim], axis=-1)
        r = c.num_v_heads // c.num_k_heads
        q, k = (
            mx.repeat(l2_normalize(t.reshape(B, L, c.num_k_heads, -1).astype(F32)), r, axis=2)
            for t in (q, k)
        )  # [B, L, Hv, Dk]: value head h reads key head h // r
        g = -mx.exp(self["A_log"].astype(F32)) * nn.softplus(
            a.astype(F32) + self["dt_bias"].astype(F32)
        )
        beta = mx.sigmoid(b.astype(F32))
        out, new_state = delta_rule(
            q * c.head_k_dim**-0.5,
            k,
            v.reshape(B, L, c.num_v_heads, c.head_v_dim),
            g,
            beta,
            state,
            c.chunk_size,
        )
        if cache is not None:
            cache.state = [new_tail, new_state.astype(state.dtype)]
        out = self.norm(out.astype(x.dtype), z)  # [B, L, Hv, Dv]
        return self.out_proj(out.reshape(B, L, c.value_dim))
