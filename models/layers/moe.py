"""Mixture-of-Experts building blocks, written once for every architecture.

Knows: how routers turn router logits into (expert ids, weights) for each token, the stacked
expert weights (``SwitchLinear``: ``mx.gather_mm`` / ``mx.gather_qmm``) and the routed SwiGLU
experts over them (``SwitchGLU``), and how their outputs combine. How the selected experts
run on this device (gathered, dense or grouped) is ``models.backend.switch_glu``'s choice.
Knows nothing about attention, caches or checkpoint names beyond
``gate_proj/up_proj/down_proj``.

Shape legend: T = tokens (batch x length, flattened), E = routed experts, A = active
experts per token (top-k), M = model dim, F = expert hidden dim, G = expert groups.

The three routers our families use:

* ``softmax_topk``   softmax over all experts, keep the top k, optionally renormalise
                     (Qwen2-MoE ``norm_topk_prob``; DBRX ``moe_normalize_expert_weights``).
* ``topk_softmax``   keep the top k logits, softmax over just those (GraniteMoE, gpt-oss).
* ``grouped_topk``   sigmoid (or softmax) scores, a selection-only correction bias, group
                     pruning, renormalisation and a scaling factor (GLM-4-MoE, Bailing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import backend


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
    if renormalize_p == 1.0:  # the common case, in two operations: bitwise the same result,
        # since the weights are probabilities (|w| = w) and x ** 1 is x exactly
        weights = weights / mx.sum(weights, axis=-1, keepdims=True)
    elif renormalize_p is not None:
        norm = mx.sum(mx.abs(weights) ** renormalize_p, axis=-1, keepdims=True) ** (
            1 / renormalize_p
        )
        weights = weights / norm
    return inds, weights


def topk_softmax(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Keep the k largest logits, then softmax over just those (GraniteMoE, gpt-oss).

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


class SwitchGLU(nn.Module):
    """Routed experts: one SwiGLU MLP each, run only for the selected (token, expert) pairs.

    ``activation`` replaces ``silu(gate) * up`` for a family with its own gated unit
    (gpt-oss's clamped SwiGLU); it is called on the gate and up projections' outputs.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        bias: bool = False,
        activation: Callable[[mx.array, mx.array], mx.array] | None = None,
    ):
        super().__init__()
        self._activation = activation
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
        return backend.switch_glu(
            x, inds, self.gate_proj, self.up_proj, self.down_proj, self._activation
        )


class SharedExpertMoE(nn.Module):
    """Routed experts picked by a gate, plus always-on shared experts added unweighted.

    The MoE block of GLM-4-MoE and Bailing (DeepSeek-V3's shape): ``gate(x)`` gives each
    token's expert ids and weights ``[T, A]``, the selected SwiGLU experts run and are summed
    with those weights, and the shared experts (one SwiGLU MLP standing for all of them) run
    on every token.

    Args:
        gate: Called on ``[T, M]``; returns expert ids and float32 weights, both ``[T, A]``.
        switch_mlp: The routed experts.
        shared_experts: The shared experts' MLP (``[T, M] -> [T, M]``), or None for none.
    """

    def __init__(
        self, gate: nn.Module, switch_mlp: SwitchGLU, shared_experts: nn.Module | None
    ) -> None:
        super().__init__()
        self.gate = gate
        self.switch_mlp = switch_mlp
        self.shared_experts = shared_experts

    def __call__(self, x: mx.array) -> mx.array:
        """Apply the block to flattened tokens.

        Args:
            x: ``[T, M]``.

        Returns:
            ``[T, M]``.
        """
        inds, weights = self.gate(x)  # [T, A], [T, A]
        y = combine_experts(self.switch_mlp(x, inds), weights)  # [T, M]
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
