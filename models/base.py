"""What every model file shares: the config base class, the model protocol and attention masks.

This module knows the contract between ``models/`` and ``server/``; it knows nothing of any
particular architecture, of HTTP, of sessions or of chat templates.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx
import mlx.nn as nn

from models import backend
from models.cache import KVCache
from models.errors import ConfigError


@dataclasses.dataclass
class BaseModelArgs:
    """Base for each architecture's ``ModelArgs`` dataclass.

    ``from_dict`` takes a ``config.json`` dictionary: keys the dataclass does not declare are
    ignored (configs carry many training-only keys), and a missing required key is named in
    the error rather than surfacing as a ``TypeError`` deep in ``__init__``.
    """

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


@runtime_checkable
class LanguageModel(Protocol):
    """The model protocol that ``server/`` relies on, and nothing more.

    ``model(tokens, cache)`` maps int32 tokens ``[batch, length]`` to logits
    ``[batch, length, vocab]``; ``cache`` is a list with one KV cache per layer, as returned
    by ``make_cache()``, or ``None`` for a stateless forward pass. ``last_only=True`` asks for
    the last position's logits alone (what a prefill samples from).
    """

    def __call__(
        self, inputs: mx.array, cache: list[Any] | None = None, last_only: bool = False
    ) -> mx.array:
        """Run a forward pass.

        Args:
            inputs: Token ids, int32 ``[batch, length]``.
            cache: One KV cache per layer, or ``None``.
            last_only: Compute logits for the last position only.

        Returns:
            Logits ``[batch, length, vocab]`` (``[batch, 1, vocab]`` with ``last_only``).
        """
        ...

    def make_cache(self) -> list[Any]:
        """Return fresh, empty per-layer KV caches for one sequence."""
        ...

    @property
    def layers(self) -> list[Any]:
        """The decoder layers, one KV cache each."""
        ...


class CausalLM(nn.Module):
    """Base of every architecture's ``Model``: what the protocol needs besides the forward.

    Subclasses provide ``__call__``, ``layers`` and ``sanitize``; one KV cache per layer is
    the same for all of them.
    """

    def make_cache(self) -> list[KVCache]:
        """Fresh, empty per-layer caches for one sequence.

        Returns:
            One ``KVCache`` per decoder layer.
        """
        return [KVCache() for _ in self.layers]


def attention_mask(length: int, cache: Any | None) -> mx.array | str | None:
    """The mask for ``length`` new query tokens attending to ``cache`` plus themselves.

    A cache that holds rows of different lengths (``BatchKVCache``) builds its own boolean
    mask; otherwise the fused kernel's bottom-right-aligned ``"causal"`` mode is exact and
    cheaper than materialising an array, and one new token needs no mask at all.

    Args:
        length: Number of new tokens in this forward pass.
        cache: The first layer's cache, or ``None``.

    Returns:
        ``None``, the string ``"causal"``, or a boolean array broadcastable to
        ``[batch, heads, length, cached + length]``.
    """
    if cache is not None and hasattr(cache, "make_mask"):
        if length == 1 and not any(cache.left_padding):
            # One new token per row and no padding (e.g. a lone stream): it sees every cached
            # position, and skipping the mask saves its construction and a select per layer.
            return None
        return cache.make_mask(length)
    return "causal" if length > 1 else None


def pre_norm_block(
    x: mx.array,
    mask: mx.array | str | None,
    cache: Any | None,
    *,
    attention: Any,
    attention_norm: Any,
    ffn: Any,
    ffn_norm: Any,
) -> mx.array:
    """The pre-norm decoder layer shared by Qwen2-MoE, GLM-4-MoE and Bailing.

    ``h = x + attention(norm(x))`` then ``h + ffn(norm(h))``; the feed-forward block (dense or
    MoE) sees the tokens flattened to ``[T, M]``, the shape the MoE routers work on.

    Args:
        x: Hidden states ``[B, L, M]``.
        mask: From ``attention_mask``.
        cache: This layer's KV cache, or None.
        attention: The attention module, called as ``attention(x, mask, cache)``.
        attention_norm: The norm before attention.
        ffn: The feed-forward block, called on ``[T, M]``.
        ffn_norm: The norm before the feed-forward block.

    Returns:
        ``[B, L, M]``.
    """
    B, L, M = x.shape
    h = x + attention(attention_norm(x), mask, cache)  # [B, L, M]
    return h + ffn(ffn_norm(h).reshape(B * L, M)).reshape(B, L, M)  # FFN on [T, M]


def run_layers(h: mx.array, layers: list[Any], cache: list[Any] | None) -> mx.array:
    """Run hidden states through a decoder stack, each layer with its own cache.

    Every architecture's inner model does exactly this between its embedding and its final
    norm; the mask is built once for the whole stack.

    Args:
        h: Embedded tokens ``[B, L, M]``.
        layers: Decoder layers, each called as ``layer(h, mask, cache)``.
        cache: One KV cache per layer, or None for a stateless pass.

    Returns:
        Hidden states ``[B, L, M]`` after the last layer.
    """
    caches = cache if cache is not None else [None] * len(layers)
    mask = attention_mask(h.shape[1], caches[0])
    with backend.forward_pass():  # one set of positions for every layer (RoPE tables)
        for layer, layer_cache in zip(layers, caches):
            h = layer(h, mask, layer_cache)
    return h
