"""Qwen3.5 / Qwen3.6 MoE (Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B): Qwen3-Next's text model.

The language model of ``Qwen3_5MoeForConditionalGeneration`` is Qwen3-Next's architecture
(``qwen3_next.py``: gated DeltaNet layers with gated full attention every
``full_attention_interval``-th layer, zero-centred norms, a softmax-routed MoE with a gated
shared expert), with these differences, all taken from transformers' ``qwen3_5_moe``:

* the DeltaNet input projections are four plain matrices, ``in_proj_qkv`` (all queries, all
  keys, all values), ``in_proj_z``, ``in_proj_b`` and ``in_proj_a``, instead of Qwen3-Next's
  two per-key-head interleaved ones (``SplitDeltaNet`` below);
* every layer is sparse (no ``decoder_sparse_step`` / ``mlp_only_layers``) and the kept router
  probabilities are always renormalised (no ``norm_topk_prob`` switch);
* the config nests the text model's keys under ``text_config`` beside a ``vision_config``,
  and rotary settings carry ``mrope_section``: multimodal RoPE splits the rotated channels
  between temporal, height and width positions, which for text alone are all the token's
  position, so it is ordinary RoPE here;
* the publisher's checkpoint names the text model ``model.language_model.*``, stores the
  experts fused (``mlp.experts.gate_up_proj`` ``[E, 2F, M]``, ``mlp.experts.down_proj``), and
  holds the vision tower (``model.visual.*``) and multi-token-prediction layers (``mtp.*``).

Sources: the Qwen team's Qwen3.5 release (the model cards and ``config.json`` of
Qwen/Qwen3.5-35B-A3B and its siblings) and transformers' ``Qwen3_5MoeForConditionalGeneration``,
the reference of our fixtures.

Parameter names follow mlx-lm's MLX layout (``language_model.model.*``,
``language_model.lm_head``), so MLX-layout checkpoints (and their per-module quantization
entries) load as they are; ``sanitize`` maps the publisher's names, and transformers'
text-only ``Qwen3_5MoeForCausalLM`` names (``model.*``), onto them.

This file does not do: images or video (the vision tower is dropped: this server is
text-only), multi-token prediction, or the dense Qwen3.5 models (``qwen3_5``).

Shape legend: B = batch, L = new tokens, M = hidden size, Hv = value heads, Dv = their width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import qwen3_next
from moeserve.models.base import BaseModelArgs
from moeserve.models.cache import CacheKind, CacheLayout, SequenceCache
from moeserve.models.layers.gated_delta import GatedDeltaNet
from moeserve.models.sanitize import drop_prefixes

PREFIX = "language_model."  # where the text model sits among our parameters
# Publisher prefixes of parts this server does not run.
_DROPPED = ("model.visual.", "visual.", "vision_tower.", "mtp.")


@dataclass
class ModelArgs(qwen3_next.ModelArgs):
    """Qwen3.5-MoE text configuration: Qwen3-Next's fields, read from ``text_config``.

    ``from_dict`` lifts ``text_config`` to the top level (a flat text config, as
    ``Qwen3_5MoeForCausalLM`` saves it, is read as it is). Every layer is sparse and the
    router always renormalises, whatever the config says.
    """

    model_type: str = "qwen3_5_moe"  # registry key

    def __post_init__(self) -> None:
        self.decoder_sparse_step, self.mlp_only_layers, self.norm_topk_prob = 1, [], True
        super().__post_init__()

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BaseModelArgs:
        """Build the arguments from a (nested or flat) config dictionary.

        Args:
            config: The parsed ``config.json``.

        Returns:
            The arguments.
        """
        text = config.get("text_config")
        if isinstance(text, dict):
            outer = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
            # The composite config's tie_word_embeddings (top level) is the one that ties.
            config = {**text, **{k: outer[k] for k in ("tie_word_embeddings",) if k in outer}}
            config["model_type"] = outer.get("model_type", "qwen3_5_moe")
        return super().from_dict(config)


class SplitDeltaNet(GatedDeltaNet):
    """Qwen3.5's gated DeltaNet: the same layer with four plain input projections."""

    def make_projections(self) -> None:
        """``in_proj_qkv`` (q, k, v side by side), ``in_proj_z``, ``in_proj_b``, ``in_proj_a``."""
        c = self.cfg
        self.in_proj_qkv = nn.Linear(c.hidden_size, c.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(c.hidden_size, c.value_dim, bias=False)
        self.in_proj_b = nn.Linear(c.hidden_size, c.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(c.hidden_size, c.num_v_heads, bias=False)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """The convolution input ``[B, L, conv_dim]``, z ``[B, L, Hv, Dv]``, b and a ``[B, L, Hv]``.

        Args:
            x: ``[B, L, M]``.

        Returns:
            As ``GatedDeltaNet.project``.
        """
        c = self.cfg
        B, L, _ = x.shape
        z = self.in_proj_z(x).reshape(B, L, c.num_v_heads, c.head_v_dim)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)


class TextModel(qwen3_next.Model):
    """The language model: Qwen3-Next's, with Qwen3.5's DeltaNet projections."""

    mixer = SplitDeltaNet


class Model(nn.Module):
    """Qwen3.5-MoE causal language model (the model protocol of ``models.base``).

    The text model sits under ``language_model`` (mlx-lm's names); everything the protocol
    asks is the text model's.
    """

    quant_overrides = qwen3_next.Model.quant_overrides

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.language_model = TextModel(args)

    def __call__(
        self, inputs: mx.array, cache: Any | None = None, last_only: bool = False
    ) -> mx.array:
        """Next-token logits ``[B, L, V]`` (see ``CausalLM.__call__``)."""
        return self.language_model(inputs, cache, last_only)

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder layers, one cache view each."""
        return self.language_model.layers

    def make_cache(self) -> SequenceCache:
        """A fresh cache for one sequence."""
        return self.language_model.make_cache()

    def cache_kinds(self) -> list[CacheKind]:
        """What each decoder layer keeps (recurrent or full)."""
        return self.language_model.cache_kinds()

    def cache_layout(self, dtype: mx.Dtype | None = None) -> CacheLayout:
        """The kinds grouped and costed (``CausalLM.cache_layout``)."""
        return self.language_model.cache_layout(dtype)

    def cache_dtype(self) -> mx.Dtype:
        """The element type of the cache state."""
        return self.language_model.cache_dtype()

    def cast_predicate(self, name: str) -> bool:
        """Whether tensor ``name`` may be cast to the serving dtype (not ``A_log``)."""
        return self.language_model.cast_predicate(name.removeprefix(PREFIX))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map any of the three layouts onto our parameter names.

        The publisher's ``model.language_model.*`` and the MLX layout's
        ``language_model.model.*`` become the text model's ``model.*`` (a flat text-only
        checkpoint already has them); the vision tower and MTP layers are dropped; the text
        model's ``sanitize`` does the rest (experts, convolution, zero-centred norms); then
        everything goes back under ``language_model.``. Sanitizing twice changes nothing.

        Args:
            weights: Checkpoint tensors by name.

        Returns:
            Tensors named as this model's parameters.
        """
        text = {}
        for name, value in drop_prefixes(weights, _DROPPED).items():
            if name.startswith("model.language_model."):
                name = "model." + name.removeprefix("model.language_model.")
            text[name.removeprefix(PREFIX)] = value
        return {PREFIX + k: v for k, v in self.language_model.sanitize(text).items()}
