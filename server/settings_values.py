"""The rules for single setting values: how they are split, checked and resolved.

Knows how a list arrives from the environment (a JSON list or comma-separated words), what
makes a host, name, model, origin, key, bit width, step ratio or keep-alive acceptable (each
refusal's message says what was expected and what was given), how an API key file is read,
and what ``dtype = "auto"`` means on the current MLX device. Knows nothing about where a value
came from or which setting it is: ``Settings`` (``server/settings.py``) applies these rules as
its validators, and pydantic plus ``server/settings_sources.py`` put the setting's name and
source in front of the message.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moeserve.server.settings_sources import conflict


def resolve_dtype(dtype: str) -> str | None:
    """Resolve a ``dtype`` setting (or ``generate --dtype``) for the current MLX device.

    Args:
        dtype: ``auto`` or a dtype name.

    Returns:
        A dtype name, or None to keep the checkpoint's dtype (``auto`` on Metal).
    """
    if dtype != "auto":
        return dtype
    from moeserve.models.backend import is_cpu  # lazily: settings load before anything needs MLX

    # MLX's CPU half-precision and quantized kernels are far slower than its float32 path.
    return "float32" if is_cpu() else None


def split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string (the environment's spellings).

    Args:
        value: The raw value.

    Returns:
        A string as a list of its items; any other value unchanged.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a valid JSON list ({e})") from None
    return [part.strip() for part in text.split(",") if part.strip()]


def check_bits(value: int | None) -> int | None:
    """MLX quantizes to 8 or 4 bits here; anything else is refused by name.

    Args:
        value: ``kv_cache_bits``.

    Returns:
        The value.
    """
    if value not in (None, 4, 8):
        raise ValueError(f"must be 8 or 4, got {value}")
    return value


def check_step_ratio(value: float) -> float:
    """0 turns the time limit off; below 1 a step could never hold its own decodes.

    Args:
        value: ``prefill_step_ratio``.

    Returns:
        The value.
    """
    if value != 0 and not value >= 1.0:
        raise ValueError(f"must be 0 (off) or at least 1, got {value}")
    return value


def check_items(values: list[str]) -> list[str]:
    """Names, keys and origins are single words; repeats are dropped, order kept.

    Args:
        values: The items of a list setting.

    Returns:
        The items without repeats.
    """
    for item in values:
        if not item or any(c.isspace() for c in item):
            raise ValueError(f"entries must be non-empty and without spaces, got {item!r}")
    return list(dict.fromkeys(values))


def check_word(value: str | None) -> str | None:
    """A host or served name: one non-empty word, or unset.

    Args:
        value: The value.

    Returns:
        The value.
    """
    if value is not None and (not value or any(c.isspace() for c in value)):
        raise ValueError(f"must be non-empty and without spaces, got {value!r}")
    return value


def check_model(value: str | None) -> str | None:
    """A model path or repo id, or unset.

    Args:
        value: The value.

    Returns:
        The value.
    """
    # A local path may contain spaces, so only blank or padded values are refused.
    if value is not None and (not value.strip() or value != value.strip()):
        raise ValueError(f"must be a non-empty path or repo id without padding, got {value!r}")
    return value


def check_origins(values: list[str]) -> list[str]:
    """CORS origins: ``*`` or an ``http://`` / ``https://`` origin each.

    Args:
        values: The origins.

    Returns:
        The origins.
    """
    for origin in values:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"an origin is * or starts with http:// or https://: {origin!r}")
    return values


def lower_level(value: Any) -> Any:
    """A log level in any case, lowered before the choices are checked.

    Args:
        value: The raw value.

    Returns:
        A string lowered; any other value unchanged.
    """
    return value.lower() if isinstance(value, str) else value


def finite(value: float) -> float:
    """A number of seconds that is neither infinite nor NaN.

    Args:
        value: The seconds.

    Returns:
        The value.
    """
    if not math.isfinite(value):
        raise ValueError("must be a finite number of seconds")
    return value


def read_key_file(path: Path) -> frozenset[str]:
    """The keys of an API key file: one per line, blank lines and ``#`` lines skipped.

    Args:
        path: The ``api_key_file`` setting.

    Returns:
        The keys.

    Raises:
        PydanticCustomError: The file cannot be read, a line holds a space, or it holds no
            keys (``conflict``: the error names ``api_key_file`` and where it was set).
    """
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise conflict(("api_key_file",), f"cannot read {path}: {e}") from None
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line):
            raise conflict(("api_key_file",), f"{path} line {number}: a key has no spaces")
        keys.append(line)
    if not keys:
        # An empty file would silently switch authentication off.
        raise conflict(("api_key_file",), f"{path} holds no keys")
    return frozenset(keys)
