"""The kinds of per-layer cache state, and what one sequence's state costs in bytes.

A model declares one ``CacheKind`` per decoder layer (``CausalLM.cache_kinds``):

* ``Full``: keys and values of every position (grouped-query attention).
* ``Sliding``: keys and values of the last ``window`` positions only (gpt-oss, Gemma-style
  local layers). The learned attention sinks of gpt-oss are a parameter of the attention
  layer, not cache state, so they need nothing here.
* ``Latent``: per-position tensors of any widths, e.g. MLA's compressed ``c_kv`` and its
  shared rotary key (DeepSeek-V3, Kimi-K2, GLM-4.7-Flash). Stored and reused exactly like
  ``Full``; only the shapes differ.
* ``Recurrent``: fixed-size state arrays (a linear-attention layer's matrix state and its
  short-convolution tail: Qwen3-Next's gated DeltaNet). It cannot be trimmed or sliced by
  position: it is exact only at the position where it was taken.

Positional kinds (all but ``Recurrent``) are stored in blocks of ``BLOCK`` positions. Layers
whose positions are kept alike (every full and latent layer; sliding layers of one window)
share one block table per sequence: a ``Group``. ``CacheLayout`` is the plain-Python summary
of a model's kinds that the scheduler budgets with; it knows no MLX arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeserve.models.cache.quant import KVQuant

# Positions per block. Small enough that a sequence's last, partly used block wastes little
# (16 rows waste at most 240 positions), large enough that block tables stay short.
BLOCK = 16


@dataclass(frozen=True)
class Full:
    """Keys and values of every position: ``[kv_heads, head_dim]`` and ``[kv_heads, v_dim]``."""

    kv_heads: int
    head_dim: int
    v_dim: int | None = None  # value head dim when it differs from the key's

    @property
    def window(self) -> int | None:
        """Positions kept per row; None keeps all."""
        return None

    def token_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The per-position tensors: keys then values."""
        return ((self.kv_heads, self.head_dim), (self.kv_heads, self.v_dim or self.head_dim))


@dataclass(frozen=True)
class Sliding(Full):
    """Keys and values of the last ``window`` positions (the query's own included)."""

    sliding_window: int = 0

    def __post_init__(self) -> None:
        if self.sliding_window < 1:
            raise ValueError(
                f"a sliding window needs at least 1 position, got {self.sliding_window}"
            )

    @property
    def window(self) -> int | None:
        """Positions kept per row."""
        return self.sliding_window


@dataclass(frozen=True)
class Latent:
    """Per-position tensors of any shapes (MLA: ``(1, kv_lora_rank)`` and ``(1, rope_dim)``)."""

    shapes: tuple[tuple[int, ...], ...]

    @property
    def window(self) -> int | None:
        """Positions kept per row: all."""
        return None

    def token_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The per-position tensors."""
        return self.shapes


@dataclass(frozen=True)
class Recurrent:
    """Fixed-size state arrays per row, whatever the length (e.g. conv tail and matrix state)."""

    shapes: tuple[tuple[int, ...], ...]


CacheKind = Full | Sliding | Latent | Recurrent


def is_positional(kind: CacheKind) -> bool:
    """Whether a kind stores per-position tensors (everything but ``Recurrent``)."""
    return not isinstance(kind, Recurrent)


@dataclass(frozen=True)
class Group:
    """Layers that share one block table per row: same window (None = every position)."""

    window: int | None
    layers: tuple[int, ...]
    bytes_per_position: int  # all of the group's layers together


class CacheLayout:
    """A model's per-layer kinds, grouped, and the bytes one row costs.

    Args:
        kinds: One kind per decoder layer.
        itemsize: Bytes per element of the cache dtype.
        quant: Positional tensors stored quantized (``kv_cache_bits``), or None.
    """

    def __init__(self, kinds: list[CacheKind], itemsize: int, quant: KVQuant | None = None) -> None:
        self.kinds = list(kinds)
        self.itemsize = itemsize
        self.quant = quant
        windows: dict[int | None, list[int]] = {}
        for i, kind in enumerate(self.kinds):
            if is_positional(kind):
                windows.setdefault(kind.window, []).append(i)
        self.groups = [
            Group(w, tuple(layers), sum(self._position_bytes(i) for i in layers))
            for w, layers in windows.items()
        ]
        self.recurrent = [i for i, k in enumerate(self.kinds) if isinstance(k, Recurrent)]
        self.row_state_bytes = sum(
            itemsize * math.prod(s) for i in self.recurrent for s in self.kinds[i].shapes
        )

    def _position_bytes(self, layer: int) -> int:
        shapes = self.kinds[layer].token_shapes()
        if self.quant is not None:
            return sum(self.quant.position_bytes(s, self.itemsize) for s in shapes)
        return self.itemsize * sum(math.prod(s) for s in shapes)

    def quantized(self, bits: int | None) -> CacheLayout:
        """This layout with positional tensors stored at ``bits`` (None: unchanged).

        Args:
            bits: 8, 4 or None.

        Returns:
            The layout to budget and store with.

        Raises:
            ValueError: ``bits`` unsupported, or a head dimension 32 does not divide.
        """
        if bits is None:
            return self
        shapes = [s for k in self.kinds if is_positional(k) for s in k.token_shapes()]
        return CacheLayout(self.kinds, self.itemsize, KVQuant.for_shapes(bits, shapes))

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position costs in every positional layer together."""
        return sum(g.bytes_per_position for g in self.groups)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in every group (what one more block of a long row costs)."""
        return BLOCK * self.bytes_per_token

    @staticmethod
    def blocks_held(window: int | None, positions: int, new: int = 1) -> int:
        """Blocks one row holds in a group after writing up to ``positions`` positions.

        A sliding group frees the blocks no query can see any more, but a step writing ``new``
        positions still needs the window before its first one: this is an upper bound.

        Args:
            window: The group's window, or None.
            positions: Positions computed, this step's included.
            new: Positions this step writes.

        Returns:
            The number of blocks.
        """
        blocks = -(-positions // BLOCK)
        if window is None:
            return blocks
        return min(blocks, -(-(window + new - 1) // BLOCK) + 1)

    def row_bytes(self, positions: int, new: int = 1) -> int:
        """Bytes a row of ``positions`` positions holds (blocks and recurrent state).

        Args:
            positions: Positions computed, this step's included.
            new: Positions this step writes (sliding groups need the window before them).

        Returns:
            The bytes.
        """
        if positions <= 0:
            return 0
        blocks = sum(
            self.blocks_held(g.window, positions, new) * BLOCK * g.bytes_per_position
            for g in self.groups
        )
        return blocks + self.row_state_bytes

    def describe(self) -> str:
        """The kinds in a few words, for the startup line (``"8 full"``)."""
        counts: dict[str, int] = {}
        for kind in self.kinds:
            name = type(kind).__name__.lower()
            if isinstance(kind, Sliding):
                name = f"sliding({kind.sliding_window})"
            counts[name] = counts.get(name, 0) + 1
        return ", ".join(f"{n} {name}" for name, n in counts.items())
