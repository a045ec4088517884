"""What every model file shares: the config base, the model protocol, the stack and the head.

``BaseModelArgs.from_dict`` reads a config (``FirstKDenseArgs`` adds DeepSeek-V3's
dense-then-MoE layer layout); ``DecoderStack`` is the inner model of every family (embedding,
the decoder layers under one mask and one backend forward pass, the final norm); ``CausalLM``
is the ``Model`` base: the forward pass of the protocol, the tied or separate output head,
``layers``, ``make_cache`` and the loading hooks' defaults. A model file keeps what differs:
its layers, its checkpoint names and its ``sanitize``.

This module knows the contract between ``models/`` and ``server/``; it knows nothing of any
particular architecture, of HTTP, of sessions or of chat templates.

Shape legend: B = batch, L = new tokens, M = hidden size, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import backend
from moeserve.models.cache import CacheKind, CacheLayout, CacheStore, SequenceCache, StepCache
from moeserve.models.errors import ConfigError
from moeserve.models.layers.rope import RopeConfig, rope_config_from
from moeserve.models.quantize import QuantOverride

# The ``cache`` of a forward pass: the engine's per-pass views of its store, or one
# sequence's own cache (which makes those views for each call).
ModelCache = StepCache | SequenceCache


@dataclasses.dataclass
class BaseModelArgs:
    """Base for each architecture's ``ModelArgs`` dataclass.

    ``from_dict`` takes a ``config.json`` dictionary: keys the dataclass does not declare are
    ignored (configs carry many training-only keys), and a missing required key is named in
    the error rather than surfacing as a ``TypeError`` deep in ``__init__``.
    """

    @property
    def rope(self) -> RopeConfig:
        """Rotary settings read from this config's fields, whichever spelling it used.

        The fields are the config's own (``rope_theta``, ``rope_scaling``,
        ``rope_parameters``, ``partial_rotary_factor``, ``max_position_embeddings``); a family
        whose config spells them otherwise overrides this.
        """
        return rope_config_from(vars(self))

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BaseModelArgs:
        """Build the arguments from a config dictionary.

        Args:
            config: The parsed ``config.json``.

        Returns:
            An instance of the concrete ``ModelArgs`` class.

        Raises:
            ConfigError: A required key is missing or a value is rejected by ``__post_init__``.
        """
        params = inspect.signature(cls).parameters
        missing = [
            name
            for name, p in params.items()
            if p.default is inspect.Parameter.empty and name not in config
        ]
        if missing:
            model_type = config.get("model_type", cls.__module__)
            raise ConfigError(
                f"config.json for {model_type!r} is missing required key(s): {', '.join(missing)}"
            )
        try:
            return cls(**{k: v for k, v in config.items() if k in params})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid config for {cls.__module__}: {e}") from e


class FirstKDenseArgs:
    """``is_sparse`` for DeepSeek-V3's layer layout, mixed into a family's ``ModelArgs``.

    The first ``first_k_dense_replace`` decoder layers keep a dense MLP; every later layer
    has the MoE block. The family's ``ModelArgs`` declares the field, with its default and
    comment (GLM-4-MoE, Bailing-MoE).
    """

    first_k_dense_replace: int

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has the MoE block (else the dense MLP).

        Args:
            layer: Layer index from 0.

        Returns:
            True for a MoE layer.
        """
        return layer >= self.first_k_dense_replace


@runtime_checkable
class LanguageModel(Protocol):
    """The model protocol that ``server/`` relies on, and nothing more.

    ``model(tokens, cache)`` maps int32 tokens ``[batch, length]`` to logits
    ``[batch, length, vocab]``; ``cache`` is one sequence's cache from ``make_cache()``, the
    per-layer views of the engine's ``CacheStore`` for the rows of this pass, or ``None`` for
    a stateless forward pass. ``cache_kinds()`` says what each layer keeps.
    ``last_only=True`` asks for the last position's
    logits alone (what a prefill samples from).
    """

    def __call__(
        self, inputs: mx.array, cache: ModelCache | None = None, last_only: bool = False
    ) -> mx.array:
        """Run a forward pass.

        Args:
            inputs: Token ids, int32 ``[batch, length]``.
            cache: The pass's cache views, one sequence's cache, or ``None``.
            last_only: Compute logits for the last position only.

        Returns:
            Logits ``[batch, length, vocab]`` (``[batch, 1, vocab]`` with ``last_only``).
        """
        ...

    def make_cache(self) -> SequenceCache:
        """Return a fresh, empty cache for one sequence."""
        ...

    def cache_kinds(self) -> list[CacheKind]:
        """What each decoder layer keeps in the cache."""
        ...

    def cache_layout(self, dtype: mx.Dtype | None = None) -> CacheLayout:
        """The kinds grouped and costed (``models.cache.CacheLayout``)."""
        ...

    def cache_dtype(self) -> mx.Dtype:
        """The element type of the model's cache state."""
        ...

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder layers, one KV cache each."""
        ...


@dataclass(frozen=True)
class StackNames:
    """Checkpoint names of the inner model's parts (MLX layout)."""

    embedding: str = "embed_tokens"  # Bailing: "word_embeddings", DBRX: "wte"
    layers: str = "layers"  # DBRX: "blocks"
    norm: str = "norm"  # DBRX: "norm_f"


class DecoderStack(nn.Module):
    """The inner model: token embedding, the decoder layers and the final norm.

    Every family's inner model does exactly this; only the names differ (``StackNames``),
    and Granite scales the embeddings (``embedding_scale``). The mask is built once for the
    whole stack, and the layers run inside one ``backend.forward_pass`` (where the CPU
    backend shares its RoPE tables): every layer's cache holds the same positions.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        layers: list[nn.Module],
        norm: nn.Module,
        names: StackNames = StackNames(),
        embedding_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.names = names
        self.embedding_scale = embedding_scale  # muP multiplier (Granite); None: none
        setattr(self, names.embedding, nn.Embedding(vocab_size, hidden_size))
        setattr(self, names.layers, layers)
        setattr(self, names.norm, norm)

    @property
    def embedding(self) -> nn.Embedding:
        """The token embedding (also the output head of tied models)."""
        return self[self.names.embedding]

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder layers, one KV cache each."""
        return self[self.names.layers]

    def __call__(self, inputs: mx.array, cache: ModelCache | None = None) -> mx.array:
        """Map token ids ``[B, L]`` to final hidden states ``[B, L, M]``.

        Args:
            inputs: Token ids.
            cache: The pass's cache views, one sequence's cache, or None (stateless).

        Returns:
            Normalised hidden states.
        """
        h = self.embedding(inputs)  # [B, L, M]
        if self.embedding_scale is not None:
            h = h * self.embedding_scale
        layers = self.decoder_layers()
        if isinstance(cache, SequenceCache):
            cache = cache.begin(*inputs.shape)
        caches: Sequence[Any] = cache if cache is not None else [None] * len(layers)
        stateless = "causal" if h.shape[1] > 1 else None
        with backend.forward_pass():  # one set of positions for every layer (RoPE tables)
            for layer, view in zip(layers, caches):
                # Each group of layers has its own mask (full, or one sliding window).
                h = layer(h, view.mask if view is not None else stateless, view)
        return self[self.names.norm](h)


class CausalLM(nn.Module):
    """Base of every architecture's ``Model``: the protocol's forward pass over a ``DecoderStack``.

    ``model(tokens, cache, last_only)`` runs the stack and the output head, which is the
    embedding matrix itself when the weights are tied (``as_linear``) and a bias-free
    ``lm_head`` otherwise. Subclasses build their stack, call ``__init__`` with it, and
    provide ``sanitize``; they override ``logits`` (Granite divides them),
    ``cast_predicate`` (tensors that must stay float32) and ``quant_overrides`` (modules
    quantized at another precision) where their family differs from the defaults here.

    Why here and not in each file, as mlx-lm has it: this tail was the same code in all five
    families (only the names, the tying and Granite's logit scale differed), and five copies
    drift. A model file still reads in mlx-lm's order (``ModelArgs``, attention, MLP, MoE
    block, decoder layer, ``Model`` with ``sanitize``) and holds everything that is its own.

    Args:
        args: The family's ``ModelArgs``.
        stack: The inner model.
        tied: Whether the output head is the embedding matrix.
        stack_name: The inner model's checkpoint name (DBRX: ``transformer``).
    """

    # Modules quantized at another precision than the rest; none unless a family says so.
    quant_overrides: tuple[QuantOverride, ...] = ()

    def __init__(
        self, args: Any, stack: DecoderStack, *, tied: bool, stack_name: str = "model"
    ) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.stack_name = stack_name
        setattr(self, stack_name, stack)
        if not tied:
            vocab_size, hidden_size = stack.embedding.weight.shape
            self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    @property
    def stack(self) -> DecoderStack:
        """The inner model (embedding, layers, final norm)."""
        return self[self.stack_name]

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder layers, one KV cache each."""
        return self.stack.decoder_layers()

    def __call__(
        self, inputs: mx.array, cache: ModelCache | None = None, last_only: bool = False
    ) -> mx.array:
        """Compute next-token logits.

        Args:
            inputs: Token ids, int32 ``[B, L]``.
            cache: The pass's cache views, one sequence's cache (``make_cache``), or None.
            last_only: Logits for the last position only (``L`` = 1 in the result).

        Returns:
            Logits ``[B, L, V]`` (``[B, 1, V]`` with ``last_only``).
        """
        h = self.stack(inputs, cache)  # [B, L, M]
        if last_only:  # prefill samples one position: skip the head's V x M work for the rest
            h = h[:, -1:]
        return self.logits(h)

    def logits(self, h: mx.array) -> mx.array:
        """The output head.

        Args:
            h: Final hidden states ``[B, L, M]``.

        Returns:
            ``[B, L, V]``.
        """
        if "lm_head" in self:
            return self.lm_head(h)
        return self.stack.embedding.as_linear(h)  # tied: the head is the embedding

    def cache_kinds(self) -> list[CacheKind]:
        """What each decoder layer keeps: the kind its attention (or mixer) declares.

        Every layer holds one module with a ``cache_kind()`` method (``Attention``, or a
        family's own mixer); the first one found in the layer is asked.

        Returns:
            One kind per decoder layer.
        """
        kinds = []
        for i, layer in enumerate(self.layers):
            owners = [m for m in layer.modules() if hasattr(m, "cache_kind")]
            if not owners:
                raise TypeError(f"decoder layer {i} has no module declaring a cache kind")
            kinds.append(owners[0].cache_kind())
        return kinds

    def cache_layout(self, dtype: mx.Dtype | None = None) -> CacheLayout:
        """The grouped kinds, costed in ``dtype`` (default: the embedding's dtype).

        Args:
            dtype: Element type of the cache.

        Returns:
            The layout.
        """
        return CacheLayout(self.cache_kinds(), (dtype or self.cache_dtype()).size)

    def cache_dtype(self) -> mx.Dtype:
        """The dtype the layers' activations (and so their caches) have: the embedding's.

        Returns:
            The dtype (a quantized embedding's scales say it).
        """
        embedding = self.stack.embedding
        dtype = embedding.weight.dtype
        return dtype if mx.issubdtype(dtype, mx.floating) else embedding.scales.dtype

    def make_cache(self) -> SequenceCache:
        """A fresh, empty cache for one sequence (a store of one row).

        Returns:
            The cache; pass it to every call of the sequence.
        """
        return SequenceCache(CacheStore(self.cache_layout(), self.cache_dtype()))

    def cast_predicate(self, name: str) -> bool:
        """Whether tensor ``name`` may be cast to the serving dtype.

        Args:
            name: A sanitized parameter name.

        Returns:
            True: by default no tensor needs to stay float32 (families with a router
            correction bias say otherwise).
        """
        return True
