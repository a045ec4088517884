"""Rotary position embeddings (RoPE) with the scaling variants our families' configs carry.

Knows: how a config spells its rotary settings (the pre-5.0 ``rope_theta``/``rope_scaling``
keys and transformers 5's ``rope_parameters``), partial rotary (only the first
``rotary_dim`` channels of each head rotate), and the frequency schedules ``default``,
``linear``, ``yarn`` and ``llama3``. It does not know which architecture uses which.

All variants reduce to a ``RopeSchedule`` (``mx.fast.rope`` with either a base or an explicit
frequency table), plus (for YaRN) an attention temperature applied to the rotated channels.
The rotation itself is ``models.backend.rope``, which on the CPU shares one cos/sin table
between the layers of a forward pass (``models/backend/rope.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import backend
from moeserve.models.backend import RopeSchedule
from moeserve.models.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary settings normalised from any config spelling."""

    theta: float  # base of the geometric frequency schedule
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    scaling: dict[str, Any] | None = None  # the type's own parameters (factor, ...)
    partial_rotary_factor: float = 1.0  # fraction of each head's channels that rotate
    max_position_embeddings: int | None = None  # YaRN falls back to it for the original length


def rope_config_from(config: dict[str, Any], default_theta: float = 10000.0) -> RopeConfig:
    """Read rotary settings from a ``config.json`` dictionary.

    Args:
        config: The model config. ``rope_parameters`` (transformers >= 5) wins over the older
            top-level ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor``.
        default_theta: Base when the config names none.

    Returns:
        The normalised settings.

    Raises:
        ConfigError: The scaling type is not supported.
    """
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.pop("rope_theta", config.get("rope_theta", default_theta))
    partial = merged.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {rope_type!r} is not supported; supported: "
            + ", ".join(SUPPORTED_ROPE_TYPES)
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        scaling=merged or None,
        partial_rotary_factor=float(partial if partial is not None else 1.0),
        max_position_embeddings=config.get("max_position_embeddings"),
    )


def _yarn(dims: int, base: float, s: dict[str, Any], max_pos: int | None) -> tuple[mx.array, float]:
    """YaRN (Peng et al. 2023, arXiv:2309.00071): blend interpolated and original frequencies.

    Channels that rotate many times over the original context keep their frequency
    (extrapolation), slow channels are divided by ``factor`` (interpolation), and a linear
    ramp between the two correction dimensions mixes them. Returns the inverse frequencies
    and the attention temperature ("mscale") applied to the rotated channels.
    """
    original = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor") or (max_pos / original)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 = extrapolate (original frequency), 0 = interpolate
    inv = (1 / (factor * pos_freqs)) * (1 - keep) + (1 / pos_freqs) * keep
    return inv, float(attn)


def _llama3(dims: int, base: float, s: dict[str, Any]) -> mx.array:
    """Llama 3.1 schedule: long wavelengths divided by ``factor``, short kept, smooth between."""
    factor, low_f, high_f = (
        s["factor"],
        s.get("low_freq_factor", 1.0),
        s.get("high_freq_factor", 4.0),
    )
    old_len = s["original_max_position_embeddings"]
    inv = 1 / base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    scaled = mx.where(wavelen > old_len / low_f, inv / factor, inv)
    medium = (wavelen >= old_len / high_f) & (wavelen <= old_len / low_f)
    return mx.where(medium, smoothed, scaled)


class RoPE(nn.Module):
    """Rotary embedding over the first ``dims`` channels of each head (non-interleaved halves).

    Shapes: ``x`` is ``[B, H, L, D]``; ``offset`` is an int or an int32 ``[B]`` array of
    per-row positions (a left-padded batch).
    """

    def __init__(self, head_dim: int, cfg: RopeConfig) -> None:
        super().__init__()
        self.dims = int(head_dim * cfg.partial_rotary_factor)
        self.attention_factor = 1.0
        base: float | None = cfg.theta
        scale, freqs = 1.0, None
        s = cfg.scaling or {}
        if cfg.rope_type == "linear":
            scale = 1.0 / float(s["factor"])  # positions divided by factor
        elif cfg.rope_type in ("yarn", "llama3"):
            if cfg.rope_type == "yarn":
                inv, self.attention_factor = _yarn(
                    self.dims, cfg.theta, s, cfg.max_position_embeddings
                )
            else:
                inv = _llama3(self.dims, cfg.theta, s)
            # mx.fast.rope takes periods (1 / inverse frequency) and then no base.
            freqs, base = 1.0 / inv, None
        self.schedule = RopeSchedule(self.dims, base, scale, freqs)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        """Rotate ``x`` as if its first token sat at position ``offset``.

        Args:
            x: Queries or keys ``[B, H, L, D]``.
            offset: Position of the first token (int or per-row ``[B]``).

        Returns:
            ``x`` with rotary embeddings applied.
        """
        if self.attention_factor != 1.0:
            # YaRN scales cos and sin, i.e. only the rotated channels.
            x = mx.concatenate(
                [x[..., : self.dims] * self.attention_factor, x[..., self.dims :]], axis=-1
            )
        return backend.rope(x, offset, self.schedule)
