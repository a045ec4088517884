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

import re
from dataclasses import dataclass
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
