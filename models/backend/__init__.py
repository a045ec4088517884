"""The one seam for device-specific speed-ups: layers call plain operations, this runs them.

Layers ask for ``sdpa``, ``swiglu``, ``rms_norm``, ``rope`` and ``switch_glu`` (the routed
experts), and a decoder stack wraps its layers in ``forward_pass``; the backend of the
current device decides how each runs:

* ``plain.Backend``: MLX's own ops, what Metal runs (its fused kernels are the fast path);
* ``cpu.CpuBackend``: MLX's Linux CPU ops plus moeserve's speed-ups, each explained in
  ``cpu.py``: compiled exp / softmax / SiLU and RMSNorm tail (``fastmath.py``), decode and
  causal-chunk attention (``cpu_attention.py``), shared RoPE tables (``rope.py``), and the
  expert-dispatch choice with its timing table (``experts.py``).

``blas.py`` (with ``gemv_forward.c``) picks the BLAS under MLX's CPU backend; it has to run
before anything loads ``mlx.core``, so this package calls ``preload`` first.

"Is this the CPU?" is answered here, by ``is_cpu``, and nowhere else. Tests swap the backend
with ``use`` rather than patching module globals. Like all of MLX, the backend is used from
one thread at a time (the engine thread).
"""

from __future__ import annotations

from moeserve.models.backend.blas import preload

preload()  # before anything below imports mlx.core: see models/backend/blas.py

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402

from moeserve.models.backend.cpu import CpuBackend  # noqa: E402
from moeserve.models.backend.plain import Backend  # noqa: E402
from moeserve.models.backend.rope import RopeSchedule  # noqa: E402

__all__ = [
    "Backend",
    "CpuBackend",
    "RopeSchedule",
    "current",
    "fast_math_in_use",
    "forward_pass",
    "is_cpu",
    "kernels",
    "rms_norm",
    "rope",
    "sdpa",
    "set_fast_math",
    "swiglu",
    "switch_glu",
    "use",
]

_PLAIN = Backend()
_CPU = CpuBackend()
_swapped: list[Backend] = []  # backends put in place by ``use``, innermost last


def is_cpu() -> bool:
    """Whether MLX computes on the CPU (its default device), e.g. Linux or a container.

    Returns:
        True on MLX's CPU backend, False on the GPU (Metal).
    """
    return mx.default_device().type == mx.DeviceType.cpu


def current() -> Backend:
    """The backend that runs the operations now.

    Returns:
        The one ``use`` put in place, else the CPU backend on the CPU and the plain one on
        the GPU.
    """
    if _swapped:
        return _swapped[-1]
    return _CPU if is_cpu() else _PLAIN


@contextmanager
def use(backend: Backend) -> Iterator[Backend]:
    """Run every operation with ``backend`` inside the block (tests and benchmarks).

    Args:
        backend: E.g. ``CpuBackend(fast_math=False)`` or ``Backend()`` (MLX's own ops).

    Yields:
        ``backend``.
    """
    _swapped.append(backend)
    try:
        yield backend
    finally:
        _swapped.pop()


def set_fast_math(wanted: bool) -> bool:
    """Turn the CPU backend's compiled kernels on or off (the ``cpu_fast_math`` setting).

    Args:
        wanted: False makes the CPU backend use MLX's own exp, softmax, SiLU and RMSNorm.

    Returns:
        The previous value.
    """
    previous, _CPU.fast_math = _CPU.fast_math, wanted
    return previous


def fast_math_in_use() -> bool:
    """Whether the compiled CPU kernels run: on the CPU, wanted, and working here.

    Returns:
        True when the current backend takes the compiled path.
    """
    backend = current()
    return isinstance(backend, CpuBackend) and backend.fast_math_active()


def kernels() -> str:
    """Which kernels run, for the startup line.

    Returns:
        ``"GPU kernels"``, ``"compiled CPU math"`` or ``"MLX CPU math"``.
    """
    return current().kernels()


def sdpa(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask: Any, sinks: Any = None
) -> mx.array:
    """Scaled dot-product attention (``Backend.sdpa``): ``[B, H, L, D]``."""
    return current().sdpa(q, k, v, scale=scale, mask=mask, sinks=sinks)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` (``Backend.swiglu``), in ``up``'s dtype."""
    return current().swiglu(gate, up)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMSNorm over the last axis (``Backend.rms_norm``), bitwise ``mx.fast.rms_norm``."""
    return current().rms_norm(x, weight, eps)


def rope(x: mx.array, offset: int | mx.array, schedule: RopeSchedule) -> mx.array:
    """Rotary embedding (``Backend.rope``), bitwise ``mx.fast.rope``."""
    return current().rope(x, offset, schedule)


def switch_glu(
    x: mx.array, inds: mx.array, gate: Any, up: Any, down: Any, activation: Any = None
) -> mx.array:
    """Routed SwiGLU experts (``Backend.switch_glu``): ``[T, A, M]``."""
    return current().switch_glu(x, inds, gate, up, down, activation)


def forward_pass() -> Any:
    """A context manager around one forward pass of the decoder stack.

    Returns:
        The current backend's scope (the CPU backend shares RoPE tables within it).
    """
    return current().forward_pass()
