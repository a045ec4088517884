"""Mixture-of-Experts building blocks, written once for every architecture.

Knows: how routers turn router logits into (expert ids, weights) for each token, how the
selected experts run (``SwitchGLU`` over stacked expert weights with ``mx.gather_mm`` /
``mx.gather_qmm``), and how their outputs combine. Knows nothing about attention, caches or
checkpoint names beyond ``gate_proj/up_proj/down_proj``.

Shape legend: T = tokens (batch x length, flattened), E = routed experts, A = active
experts per token (top-k), M = model dim, F = expert hidden dim, G = expert groups.

The three routers our families use:

* ``softmax_topk``   softmax over all experts, keep the top k, optionally renormalise
                     (Qwen2-MoE ``norm_topk_prob``; DBRX ``moe_normalize_expert_weights``).
* ``topk_softmax``   keep the top k logits, softmax over just those (GraniteMoE).
* ``grouped_topk``   sigmoid (or softmax) scores, a selection-only correction bias, group
                     pruning, renormalisation and a scaling factor (GLM-4-MoE, Bailing).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from models.blas import gemv_forwarding
from models.layers.fastmath import swiglu


def softmax_topk(
    logits: mx.array, k: int, renormalize_p: float | None = None
) -> tuple[mx.array, mx.array]:
    """Softmax over all experts, then keep the k most probable.

    Args:
        logits: Router logits ``[T, E]``.
        k: Experts per token (A).
        renormalize_p: If set, divide the kept weights by their p-norm (p = 1 makes them sum
            to one, Qwen2-MoE's ``norm_topk_prob``; DBRX configures p).

    Returns:
        Expert ids int32 ``[T, A]`` and float32 weights ``[T, A]``.
    """
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # [T, E]
    inds = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]  # [T, A]
    weights = mx.take_along_axis(probs, inds, axis=-1)  # [T, A]
    if renormalize_p is not None:
        norm = mx.sum(mx.abs(weights) ** renormalize_p, axis=-1, keepdims=True) ** (
            1 / renormalize_p
        )
        weights = weights / norm
    return inds, weights


def topk_softmax(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Keep the k largest logits, then softmax over just those (GraniteMoE).

    Args:
        logits: Router logits ``[T, E]``.
        k: Experts per token (A).

    Returns:
        Expert ids int32 ``[T, A]`` and float32 weights ``[T, A]`` summing to one.
    """
    inds = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]  # [T, A]
    kept = mx.take_along_axis(logits, inds, axis=-1).astype(mx.float32)  # [T, A]
    return inds, mx.softmax(kept, axis=-1)


def grouped_topk(
    logits: mx.array,
    k: int,
    *,
    score_function: str = "sigmoid",
    correction_bias: mx.array | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    normalize: bool = True,
    scaling_factor: float = 1.0,
) -> tuple[mx.array, mx.array]:
    """Grouped expert selection with a selection-only bias (GLM-4-MoE, Bailing / Ling).

    This is DeepSeek-V3's routing ("auxiliary-loss-free load balancing", DeepSeek-AI 2024,
    arXiv:2412.19437, section 2.1.2), which GLM-4.5 and Ling 2.0 adopt. Step by step:

    1. Score every expert independently: ``s = sigmoid(logits)`` (or a softmax over experts
       for configs that ask for it). These scores become the mixing weights.
    2. Add the per-expert ``correction_bias`` to get *selection* scores. The bias is tuned
       during training to balance expert load; it decides *which* experts run but never
       *how much* they count, so step 5 goes back to the unbiased scores.
    3. Group pruning (only when ``n_group > 1``): split the E experts into G groups of
       E/G, rate each group by the sum of its two best selection scores, keep the
       ``topk_group`` best groups and set the selection scores of every other group to
       -inf, so that no expert outside them can be picked even when biased scores are
       negative. On multi-node training this bounds how many devices a token is sent to.
    4. Keep the k experts with the highest remaining selection scores.
    5. Their weights are the unbiased scores from step 1, renormalised to sum to one when
       ``normalize`` is set (with a tiny epsilon against an all-zero row), then multiplied
       by ``scaling_factor`` (``routed_scaling_factor``), which restores the magnitude the
       routed experts had during training relative to the shared experts.

    Args:
        logits: Router logits ``[T, E]``.
        k: Experts per token (A).
        score_function: ``"sigmoid"`` or ``"softmax"``.
        correction_bias: Selection-only bias ``[E]``, or None.
        n_group: Number of expert groups G (1 disables pruning).
        topk_group: Groups kept per token.
        normalize: Renormalise the kept weights to sum to one.
        scaling_factor: Multiplier applied to the final weights.

    Returns:
        Expert ids int32 ``[T, A]`` and float32 weights ``[T, A]``.
    """
    logits = logits.astype(mx.float32)
    if score_function == "sigmoid":
        scores = mx.sigmoid(logits)  # [T, E]
    elif score_function == "softmax":
        scores = mx.softmax(logits, axis=-1)  # [T, E]
    else:
        raise ValueError(f"unknown router score_function {score_function!r}")
    select = scores + correction_bias if correction_bias is not None else scores  # [T, E]
    if n_group > 1:
        grouped = mx.unflatten(select, -1, (n_group, -1))  # [T, G, E/G]
        group_rating = mx.topk(grouped, 2, axis=-1).sum(axis=-1)  # [T, G]
        drop = n_group - topk_group
        dropped = mx.argpartition(group_rating, kth=drop - 1, axis=-1)[..., :drop]  # [T, G-kept]
        grouped = mx.put_along_axis(grouped, dropped[..., None], mx.array(-mx.inf), axis=-2)
        select = mx.flatten(grouped, -2, -1)  # [T, E]
    inds = mx.argpartition(-select, kth=k - 1, axis=-1)[..., :k]  # [T, A]
    weights = mx.take_along_axis(scores, inds, axis=-1)  # [T, A], unbiased
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, weights * scaling_factor


class LinearRouter(nn.Module):
    """A router that is one bias-free linear map to per-expert logits (checkpoint name ``layer``).

    DBRX and GraniteMoE store their routers this way (``*.router.layer.weight``).
    """

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """Router logits.

        Args:
            x: ``[T, M]``.

        Returns:
            ``[T, E]``.
        """
        return self.layer(x)


def combine_experts(expert_out: mx.array, weights: mx.array) -> mx.array:
    """Weighted sum of each token's expert outputs.

    Args:
        expert_out: ``[T, A, M]``.
        weights: ``[T, A]`` (float32 from the routers).

    Returns:
        ``[T, M]`` in ``expert_out``'s dtype.
    """
    out = (expert_out * weights[..., None].astype(expert_out.dtype)).sum(axis=-2)
    return out.astype(expert_out.dtype)


class SwitchLinear(nn.Module):
    """One linear layer per expert, weights stacked as ``[E, out, in]`` (the MLX layout)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    def __call__(self, x: mx.array, inds: mx.array, sorted_indices: bool = False) -> mx.array:
        """Apply expert ``inds[t, a]`` to ``x``.

        Args:
            x: ``[T, 1, 1, in]`` or ``[T, A, 1, in]`` (broadcast against ``inds``).
            inds: Expert ids ``[T, A]``.
            sorted_indices: ``inds`` is sorted (lets the kernel stream each expert once).

        Returns:
            ``[T, A, 1, out]``.
        """
        y = mx.gather_mm(
            x, self["weight"].swapaxes(-1, -2), rhs_indices=inds, sorted_indices=sorted_indices
        )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][inds], -2)
        return y

    def all_experts(self, x: mx.array) -> mx.array:
        """Apply every expert to every token (the dense dispatch).

        Args:
            x: ``[T, in]`` or ``[E, T, in]``.

        Returns:
            ``[E, T, out]``.
        """
        y = x @ self["weight"].swapaxes(-1, -2)
        return y + self["bias"][:, None, :] if "bias" in self else y

    def one_expert(self, x: mx.array, e: int) -> mx.array:
        """Apply expert ``e`` to the rows ``x`` ``[N, in]`` (the grouped dispatch).

        Args:
            x: Rows routed to expert ``e``.
            e: Expert index.

        Returns:
            ``[N, out]``.
        """
        y = x @ self["weight"][e].T
        return y + self["bias"][e] if "bias" in self else y

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        """Quantized copy of this layer (called by ``nn.quantize``).

        Args:
            group_size: Elements per quantization group.
            bits: Bits per weight.
            mode: MLX quantization mode.

        Returns:
            A ``QuantizedSwitchLinear``.
        """
        return QuantizedSwitchLinear.from_float(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """``SwitchLinear`` with quantized weights (``weight``/``scales``/``biases`` per expert)."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        bias: bool = False,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((num_experts, output_dims, input_dims))
        self.weight, self.scales, *rest = mx.quantize(w, group_size, bits, mode=mode)
        self.biases = rest[0] if rest else None
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    @classmethod
    def from_float(
        cls, layer: SwitchLinear, group_size: int, bits: int, mode: str
    ) -> QuantizedSwitchLinear:
        """Quantize a float ``SwitchLinear``.

        Args:
            layer: The float layer.
            group_size: Elements per quantization group.
            bits: Bits per weight.
            mode: MLX quantization mode.

        Returns:
            The quantized layer.
        """
        E, out, inp = layer.weight.shape
        q = cls(inp, out, E, "bias" in layer, group_size, bits, mode)
        q.weight, q.scales, *rest = mx.quantize(layer.weight, group_size, bits, mode=mode)
        q.biases = rest[0] if rest else None
        if "bias" in layer:
            q.bias = layer.bias
        return q

    def __call__(self, x: mx.array, inds: mx.array, sorted_indices: bool = False) -> mx.array:
        """Same contract as ``SwitchLinear.__call__``."""
        y = mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=inds,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][inds], -2)
        return y


# Sorting tokens by expert pays off once there are enough (token, expert) pairs for each
# expert's weights to be reused across several rows.
_SORT_THRESHOLD = 64

# How routed experts run on the CPU backend, by number of tokens T. Measured with
# bench/moe_dispatch.py (2-core x86-64, OpenBLAS, 16 experts 512->256, top-4; ms per call).
# MLX's CPU gather_mm is one 1-row matmul per (token, expert) pair, so its speed depends on
# how the BLAS runs 1-row products. With the gemv shim of models/blas.py they stream each
# weight once and gather wins up to ~100 tokens (pairs are sorted by expert from T = 16 on,
# so consecutive products reuse one expert's weights from cache):
#      T    gather   dense   grouped
#      1      0.2     1.4      0.6
#      4      0.6     3.3      2.3
#     16      1.9     3.2      4.8
#     64      4.9    11.9      8.7
#     96      7.3    17.9      9.2
#    128     11.1    26.2     11.0
#    512     53.2    87.5     18.3
# Without the shim (another BLAS, no C compiler), 1-row products pack the whole weight first
# and gather only wins at a few tokens:
#      T    gather   dense   grouped
#      1      0.4     2.9      0.9
#      4      3.0     3.2      2.8
#     16      8.6     5.0      5.8
#     32     13.5     6.9      6.7
#    512    185.9    86.9     24.8
#  * gather: gather_mm; a few tokens touch only their A experts each.
#  * dense: every expert on every token as E batched matmuls, then keep the A selected
#    outputs: E/A times the FLOPs but BLAS-efficient and free of host syncs.
#  * grouped (prefill chunks, big batches): group the (token, expert) pairs by expert and
#    run one contiguous matmul per expert. It needs the per-expert counts on the host, one
#    sync per layer, which pays for itself once each expert gets several rows.
# Quantized experts and the Metal backend always use gather_mm / gather_qmm, which are the
# right kernels there.
CPU_GEMV_GATHER_MAX_TOKENS = 96
CPU_GATHER_MAX_TOKENS = 4
CPU_DENSE_MAX_TOKENS = 24


def dispatch_strategy(tokens: int, quantized: bool, dtype: mx.Dtype = mx.float32) -> str:
    """Pick how routed experts run for a batch of ``tokens`` tokens.

    Args:
        tokens: T.
        quantized: Whether the expert weights are quantized.
        dtype: The activations' dtype. MLX's CPU ``gather_mm`` takes float32 only, so half
            precision on the CPU never uses it.

    Returns:
        ``"gather"``, ``"dense"`` or ``"grouped"``.
    """
    if quantized or mx.default_device().type != mx.DeviceType.cpu:
        return "gather"
    if dtype == mx.float32:
        if gemv_forwarding():
            return "gather" if tokens <= CPU_GEMV_GATHER_MAX_TOKENS else "grouped"
        if tokens <= CPU_GATHER_MAX_TOKENS:
            return "gather"
    return "dense" if tokens <= CPU_DENSE_MAX_TOKENS else "grouped"


class SwitchGLU(nn.Module):
    """Routed experts: one SwiGLU MLP each, run only for the selected (token, expert) pairs."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, bias=False):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts, bias)

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        """Run each token through its selected experts.

        Args:
            x: ``[T, M]``.
            inds: Expert ids ``[T, A]``.

        Returns:
            Per-expert outputs ``[T, A, M]`` (combine with ``combine_experts``).
        """
        quantized = isinstance(self.gate_proj, QuantizedSwitchLinear)
        strategy = dispatch_strategy(x.shape[0], quantized, x.dtype)
        if strategy == "dense":
            return self._dense(x, inds)
        if strategy == "grouped":
            return self._grouped(x, inds)
        return self._gathered(x, inds)

    def _dense(self, x: mx.array, inds: mx.array) -> mx.array:
        h = swiglu(self.gate_proj.all_experts(x), self.up_proj.all_experts(x))  # [E, T, F]
        out = self.down_proj.all_experts(h).swapaxes(0, 1)  # [T, E, M]
        return mx.take_along_axis(out, inds[..., None].astype(mx.int32), axis=1)  # [T, A, M]

    def _grouped(self, x: mx.array, inds: mx.array) -> mx.array:
        T, A = inds.shape
        flat = inds.flatten()  # [T*A]
        order = mx.argsort(flat)  # pairs grouped by expert
        E = self.gate_proj.weight.shape[0]
        counts = mx.zeros((E,), mx.int32).at[flat].add(1).tolist()  # host sync (see above)
        rows = x[order // A]  # [T*A, M], contiguous per expert
        outs, start = [], 0
        for e, count in enumerate(counts):
            if count:
                seg = rows[start : start + count]  # [N_e, M]
                h = swiglu(self.gate_proj.one_expert(seg, e), self.up_proj.one_expert(seg, e))
                outs.append(self.down_proj.one_expert(h, e))  # [N_e, M]
                start += count
        return mx.concatenate(outs)[mx.argsort(order)].reshape(T, A, -1)

    def _gathered(self, x: mx.array, inds: mx.array) -> mx.array:
        T, A = inds.shape
        if inds.size >= _SORT_THRESHOLD:
            # Visit (token, expert) pairs grouped by expert so each expert's weights are read once.
            flat = inds.flatten()  # [T*A]
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            xs = x[order // A][:, None, None]  # [T*A, 1, 1, M]
            h = self._glu(xs, flat[order][:, None], sorted_indices=True)  # [T*A, 1, 1, M]
            return h.squeeze((1, 2))[inv].reshape(T, A, -1)
        h = self._glu(x[:, None, None], inds, sorted_indices=False)  # [T, A, 1, M]
        return h.squeeze(-2)

    def _glu(self, x: mx.array, inds: mx.array, sorted_indices: bool) -> mx.array:
        gate = self.gate_proj(x, inds, sorted_indices)
        up = self.up_proj(x, inds, sorted_indices)
        return self.down_proj(swiglu(gate, up), inds, sorted_indices)
