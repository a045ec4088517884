"""The startup summary line and the sizes and names it is made of.

Knows how to describe a loaded model in one log line (served name and aliases, family,
parameter count, weight dtypes and quantization, bytes, context length, KV budget and layout,
BLAS and kernels, the API's URL) and how to write counts, byte sizes and the base URL for
people. Knows nothing about loading a model or starting the engine: ``startup.py`` does that
and logs the line; ``server/distributed/launch.py`` writes its sizes with ``format_bytes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
from mlx.utils import tree_flatten

from moeserve.models.backend import kernels
from moeserve.models.backend.blas import blas_in_use
from moeserve.models.quantize import count_parameters
from moeserve.server.settings import Settings

if TYPE_CHECKING:  # startup imports this module; the type is only named in hints
    from moeserve.server.startup import ServedModel


def format_count(n: int) -> str:
    """A parameter count in millions or billions, e.g. ``2.7B``.

    Args:
        n: The count.

    Returns:
        The text.
    """
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_bytes(n: int) -> str:
    """A size in MiB, or GiB from 1 GiB on, e.g. ``14.3 GiB``.

    Args:
        n: Bytes.

    Returns:
        The text.
    """
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def server_url(host: str, port: int) -> str:
    """The API's base URL, with an IPv6 host in brackets.

    Args:
        host: The listening address.
        port: The port.

    Returns:
        E.g. ``http://127.0.0.1:8000/v1``.
    """
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/v1"


def weight_bytes(served: ServedModel) -> int:
    """Bytes of the loaded model's parameters.

    Args:
        served: The loaded model.

    Returns:
        The bytes.
    """
    return sum(v.nbytes for _, v in tree_flatten(served.loaded.model.parameters()))


def summary_line(
    served: ServedModel, settings: Settings, kv_cache_max_bytes: int | None = None
) -> str:
    """One line for the log at startup: what is served, how big, how fast a BLAS, and where.

    Args:
        served: The loaded model.
        settings: The server settings (for the address).
        kv_cache_max_bytes: The resolved KV budget, None for no byte bound.

    Returns:
        The line.
    """
    params = [v for _, v in tree_flatten(served.loaded.model.parameters())]
    floats = sorted(
        {
            str(v.dtype).removeprefix("mlx.core.")
            for v in params
            if mx.issubdtype(v.dtype, mx.floating)
        }
    )
    quant = served.loaded.config.get("quantization")
    bits = f", {quant['bits']}-bit quantized" if isinstance(quant, dict) and "bits" in quant else ""
    aliases = f" (aliases: {', '.join(served.aliases)})" if served.aliases else ""
    layers = served.loaded.model.cache_layout().describe()
    bound = "no byte bound" if kv_cache_max_bytes is None else format_bytes(kv_cache_max_bytes)
    if settings.kv_cache_bits:
        bound += f", {settings.kv_cache_bits}-bit"
    return (
        f"serving {served.model_id}{aliases}: {served.loaded.model_type}, "
        f"{format_count(count_parameters(served.loaded.model))} parameters, "
        f"{'/'.join(floats) or 'no floating'} weights{bits}, "
        f"{format_bytes(sum(v.nbytes for v in params))}, context {served.max_model_len} tokens, "
        f"KV cache {bound} ({layers} layers), BLAS: {blas_in_use()}, {kernels()}; "
        f"at {server_url(settings.host, settings.port)}"
    )
