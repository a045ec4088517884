"""Which part of a model one rank of a distributed server holds, for every family at once.

Two ways to split a model over ``size`` ranks (``server.distributed`` runs them):

- **Pipeline** (``PipelineShard``): rank r holds a contiguous slice of the decoder layers
  (``layer_range``); rank 0 also holds the embedding, the final norm and the output head.
  The loader reads only the tensors of that slice (``keep_tensor`` on checkpoint names,
  so the safetensors index can skip whole files), and the kept layers are renumbered from 0
  (``rename``) because the rank's model is built with only them.
- **Tensor** (``TensorShard``): every rank holds every layer, but only its part of each:
  its attention heads (q/k/v split by output rows, the output projection by input columns),
  its columns of the dense MLPs, and its experts by index (expert parallel). Which modules
  those are is declared once per *kind of module*, not per family: the shared attention and
  MLP classes and ``SwitchGLU`` are the same in every family file (``models.layers``), so the
  rules in ``shard_plan`` cover them all; a family with a module they do not know (DeepSeek's
  MLA, Qwen3-Next's linear attention) keeps that module whole on every rank, which is
  correct and only costs memory. The split modules' partial outputs are combined with
  ``all_sum`` (``server.distributed.tensor``).

Every split is computed from the config and the rank, the same on every rank, with no
communication. This module knows module trees and tensor names; it knows nothing of
sockets, of collectives or of the engine.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from moeserve.models.base import CausalLM


class Shard(Protocol):
    """What the loader asks of a rank's part of a model (``models.loader.load``)."""

    def keep_tensor(self, name: str) -> bool:
        """Whether the rank reads this checkpoint tensor at all."""
        ...

    def prepare(self, model: nn.Module) -> None:
        """Cut the freshly built model down to the rank's part, in place."""
        ...

    def rename(self, model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map the sanitized tensors onto the prepared model's parameters."""
        ...


def causal_lm(model: nn.Module) -> tuple[str, CausalLM]:
    """The ``CausalLM`` inside a model and its parameter-name prefix.

    A text model is its own; a multimodal release wraps it (Qwen3.5's ``language_model``).

    Args:
        model: A built model.

    Returns:
        ``(prefix, lm)``: ``""`` or e.g. ``"language_model."``, and the ``CausalLM``.

    Raises:
        TypeError: No ``CausalLM`` is found.
    """
    if isinstance(model, CausalLM):
        return "", model
    for name, child in model.children().items():
        if isinstance(child, CausalLM):
            return f"{name}.", child
    raise TypeError(f"{type(model).__name__} holds no CausalLM; it cannot be sharded")


def layer_range(num_layers: int, rank: int, size: int) -> tuple[int, int]:
    """The decoder layers ``[start, end)`` of one pipeline rank: contiguous, near-equal.

    Earlier ranks take the remainder, one layer each.

    Args:
        num_layers: Decoder layers of the model.
        rank: This rank.
        size: Ranks in the pipeline.

    Returns:
        ``(start, end)``.

    Raises:
        ValueError: Fewer layers than ranks.
    """
    if num_layers < size:
        raise ValueError(f"{num_layers} decoder layers cannot be split over {size} ranks")
    base, extra = divmod(num_layers, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# A decoder layer's index in a checkpoint name, whatever the family calls its stack
# ("model.layers.3.", "transformer.blocks.3.", "model.language_model.layers.3.").
_LAYER = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")


@dataclass
class PipelineShard:
    """One rank's contiguous slice of the decoder layers (set by ``prepare``).

    Attributes:
        rank: This rank.
        size: Ranks in the pipeline.
        start: First layer held.
        end: One past the last layer held.
        num_layers: Layers of the whole model.
    """

    rank: int
    size: int
    start: int = 0
    end: int = 0
    num_layers: int = 0

    @property
    def holds_ends(self) -> bool:
        """Whether this rank holds the embedding, the final norm and the head (rank 0)."""
        return self.rank == 0

    def keep_tensor(self, name: str) -> bool:
        """Whether a checkpoint tensor (publisher or MLX name) belongs to this rank.

        Args:
            name: The tensor's name in the checkpoint.

        Returns:
            True for this slice's layers and, on rank 0, every tensor outside the layers.
        """
        match = _LAYER.search(name)
        if match is None:
            return self.holds_ends
        return self.start <= int(match.group(1)) < self.end

    def prepare(self, model: nn.Module) -> None:
        """Cut a freshly built model down to this rank's part, in place; sets the slice.

        The other layers (never evaluated, so never allocated) are dropped; a rank other
        than 0 also drops the embedding, the final norm and the head.

        Args:
            model: The built model (random, unevaluated parameters).
        """
        _, lm = causal_lm(model)
        stack = lm.stack
        self.num_layers = len(stack.decoder_layers())
        self.start, self.end = layer_range(self.num_layers, self.rank, self.size)
        stack[stack.names.layers] = stack.decoder_layers()[self.start : self.end]
        if not self.holds_ends:
            stack.pop(stack.names.embedding)
            stack.pop(stack.names.norm)
            if "lm_head" in lm:
                lm.pop("lm_head")

    def rename(self, model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Renumber sanitized layer tensors from this slice's first layer to 0.

        Args:
            model: The prepared model (for its stack's parameter prefix).
            weights: Sanitized tensors of this rank.

        Returns:
            Tensors named as the prepared model's parameters (others outside the slice dropped).
        """
        prefix, lm = causal_lm(model)
        layers = f"{prefix}{lm.stack_name}.{lm.stack.names.layers}."
        renamed: dict[str, mx.array] = {}
        for name, value in weights.items():
            if not name.startswith(layers):
                if self.holds_ends:
                    renamed[name] = value
                continue
            index, rest = name[len(layers) :].split(".", 1)
            if self.start <= int(index) < self.end:
                renamed[f"{layers}{int(index) - self.start}.{rest}"] = value
        return renamed


# ----- tensor parallel -------------------------------------------------------------------------

_PARAMS = ("weight", "bias", "scales", "biases")  # a linear's tensors, float or quantized


@dataclass(frozen=True)
class Split:
    """How one tensor is cut: which axis, and which part this rank keeps.

    ``rows`` (axis 0): the axis is made of ``segments`` (relative sizes: fused q|k|v is
    ``(H, K, K)``), each cut into ``size`` equal parts; the rank keeps its part of each.
    ``cols`` (last axis): cut into ``size`` equal parts; a bias is kept whole on rank 0 and
    zero elsewhere, since the partial outputs are summed. ``experts`` (axis 0): experts
    ``[lo, hi)``.
    """

    kind: str  # "rows", "cols" or "experts"
    segments: tuple[int, ...] = (1,)
    lo: int = 0
    hi: int = 0

    def apply(self, name: str, t: mx.array, rank: int, size: int) -> mx.array:
        """This rank's part of tensor ``name`` (its last component says weight or bias).

        Args:
            name: The parameter name.
            t: The whole tensor.
            rank: This rank.
            size: Ranks.

        Returns:
            The part.
        """
        # Every part is a copy: a slice is a view that would keep the whole tensor alive.
        if self.kind == "experts":
            return mx.contiguous(t[self.lo : self.hi])
        if self.kind == "cols":
            if name.endswith(".bias"):
                return t if rank == 0 else mx.zeros_like(t)
            part = t.shape[-1] // size
            return mx.contiguous(t[..., rank * part : (rank + 1) * part])
        total, parts, start = sum(self.segments), [], 0
        for seg in self.segments:
            length = t.shape[0] * seg // total
            part = length // size
            parts.append(t[start + rank * part : start + (rank + 1) * part])
            start += length
        return mx.contiguous(parts[0]) if len(parts) == 1 else mx.concatenate(parts, axis=0)


@dataclass
class TensorShard:
    """This rank's part of every layer: heads, MLP columns and experts (tensor parallel).

    ``prepare`` decides it from the built model, module by module, by kind of module:

    - ``Attention`` (``models.layers.attention``): query heads and key/value heads in
      contiguous blocks (q, k, v or the fused projection by rows, sinks too), the output
      projection by columns; needs both head counts divisible by ``size``, else the layer
      keeps its attention whole. Its output projection is summed across ranks. A family's
      subclass of it is not split (MiniMax-M2's q/k norm spans all heads).
    - ``GatedMLP``: the hidden width by rows of gate/up and columns of down.
    - ``SwitchGLU``: experts by index, near-equal contiguous ranges; tokens routed to another
      rank's expert contribute zero here (the router runs whole on every rank).
    - The feed-forward block of a layer that holds a split MLP or experts is summed across
      ranks once, at its output: everything in it is either whole on every rank (routers,
      gates, computed from the same input) or a partial sum. A block whose dense MLP cannot be
      split stays whole.

    Anything else (MLA, linear attention, norms, embedding, head) stays whole on every rank.

    Attributes:
        rank: This rank.
        size: Ranks.
        splits: Parameter name -> its ``Split`` (set by ``prepare``).
        summed: Module paths whose output is ``all_sum``-ed.
        experts: ``SwitchGLU`` path -> (first expert held, experts held).
    """

    rank: int
    size: int
    splits: dict[str, Split] = field(default_factory=dict)
    summed: list[str] = field(default_factory=list)
    experts: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def experts_held(self) -> int:
        """Experts per MoE layer on this rank (0: no MoE layer was split)."""
        return next(iter(self.experts.values()), (0, 0))[1]

    def keep_tensor(self, name: str) -> bool:
        """Every rank reads every tensor (slicing it before anything is evaluated)."""
        return True

    def prepare(self, model: nn.Module) -> None:
        """Decide the splits and cut the fresh model's parameters to match, in place.

        Args:
            model: The built model (random, unevaluated parameters).
        """
        from moeserve.models.layers.attention import Attention

        prefix, lm = causal_lm(model)
        stack_path = f"{prefix}{lm.stack_name}.{lm.stack.names.layers}"
        for i, layer in enumerate(lm.layers):
            path = f"{stack_path}.{i}"
            for name, child in layer.children().items():
                child_path = f"{path}.{name}"
                if isinstance(child, nn.Module) and _contains(child, Attention):
                    for sub, attn in child.named_modules():
                        # Exactly the shared class: a family's subclass may mix heads
                        # (MiniMax-M2 normalises q and k over all heads at once).
                        if type(attn) is Attention:
                            self._attention(_join(child_path, sub), attn)
                elif isinstance(child, nn.Module):
                    self._block(child_path, child)
        for path, module in model.named_modules():
            for param in (*_PARAMS, "sinks"):
                name = _join(path, param)
                if name in self.splits and param in module:
                    module[param] = self.splits[name].apply(name, module[param], *self._rs)

    def rename(self, model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Cut the sanitized tensors as ``prepare`` cut the parameters.

        Args:
            model: The prepared model.
            weights: Sanitized tensors (whole).

        Returns:
            This rank's parts.
        """
        return {
            k: self.splits[k].apply(k, v, *self._rs) if k in self.splits else v
            for k, v in weights.items()
        }

    @property
    def _rs(self) -> tuple[int, int]:
        return self.rank, self.size

    def _linear(self, path: str, split: Split) -> None:
        for param in _PARAMS:
            self.splits[f"{path}.{param}"] = split

    def _attention(self, path: str, attn: nn.Module) -> None:
        c = attn.cfg
        if c.num_heads % self.size or c.num_kv_heads % self.size:
            return  # kept whole: heads cannot be dealt out evenly
        n = c.names
        if n.qkv:
            self._linear(
                f"{path}.{n.qkv}", Split("rows", (c.num_heads, c.num_kv_heads, c.num_kv_heads))
            )
        else:
            for proj in (n.q, n.k, n.v):
                self._linear(f"{path}.{proj}", Split("rows"))
        self._linear(f"{path}.{n.o}", Split("cols"))
        self.splits[f"{path}.sinks"] = Split("rows")
        attn.cfg = dataclasses.replace(
            c, num_heads=c.num_heads // self.size, num_kv_heads=c.num_kv_heads // self.size
        )
        self.summed.append(f"{path}.{n.o}")

    def _block(self, path: str, block: nn.Module) -> None:
        from moeserve.models.layers.mlp import GatedMLP
        from moeserve.models.layers.moe import SwitchGLU

        mlps = [(p, m) for p, m in block.named_modules() if isinstance(m, GatedMLP)]
        switches = [(p, m) for p, m in block.named_modules() if isinstance(m, SwitchGLU)]
        if not mlps and not switches:
            return
        if any(m.gate_proj.weight.shape[0] % self.size for _, m in mlps):
            return  # a dense part cannot be split: the whole block stays whole
        for sub, _ in mlps:
            mlp = _join(path, sub)
            self._linear(f"{mlp}.gate_proj", Split("rows"))
            self._linear(f"{mlp}.up_proj", Split("rows"))
            self._linear(f"{mlp}.down_proj", Split("cols"))
        for sub, switch in switches:
            num = switch.gate_proj.weight.shape[0]
            lo, hi = layer_range(num, self.rank, self.size)
            glu = _join(path, sub)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                self._linear(f"{glu}.{proj}", Split("experts", lo=lo, hi=hi))
            self.experts[glu] = (lo, hi - lo)
        self.summed.append(path)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _contains(module: nn.Module, kind: type) -> bool:
    return any(isinstance(m, kind) for _, m in module.named_modules())
