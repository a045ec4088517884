"""Use an optimized BLAS under MLX's Linux CPU backend when one is installed.

MLX's Linux CPU wheel bundles the reference BLAS, whose float32 matmul runs at a few
GFLOP/s; OpenBLAS (or BLIS) on the same machine is 15-30x faster. Loading the optimized
library into the process's global symbol scope *before* MLX's shared library is loaded makes
the dynamic linker bind MLX's ``cblas_*`` calls to it: the same effect as ``LD_PRELOAD``,
without asking the user to set it. After ``mlx.core`` is imported it is too late, so this
runs first thing in ``models/backend/__init__.py``.

With OpenBLAS, matrix-vector products (one-row matmuls: every single-stream decode step)
also go through a small C shim, ``gemv_forward.c``, that sends them to ``cblas_sgemv``:
OpenBLAS before 0.3.27 runs them as general products, packing each weight matrix first, and
is 2-5x slower than its own sgemv on them. The shim is compiled once with the system C
compiler into moeserve's cache directory (``MOESERVE_CACHE_DIR``, else ``~/.cache/moeserve``;
the temp directory when neither is writable); without a compiler the BLAS is used as it is.

macOS uses Accelerate and Metal and is left alone. ``MOESERVE_BLAS`` selects: ``auto``
(default: the first library found), ``none`` (keep the bundled one), or a library path.
``MOESERVE_BLAS_GEMV=0`` turns the shim off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Searched in order; Debian/Ubuntu put the pthread OpenBLAS behind the first path.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libblis.so.4",
    "/usr/lib/aarch64-linux-gnu/libblis.so.4",
)

_REFERENCE = "reference BLAS bundled with MLX (slow; install libopenblas0-pthread)"
_state: dict[str, str] = {}


def _find() -> str | None:
    for candidate in _CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return ctypes.util.find_library("openblas")


_SHIM_SOURCE = Path(__file__).with_name("gemv_forward.c")


def _cache_dir() -> Path:
    # The same directory as the demo model (devtools/demo.py); the Docker image points it at a
    # volume.
    return Path(os.environ.get("MOESERVE_CACHE_DIR", Path.home() / ".cache" / "moeserve"))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _build_shim() -> Path | None:
    """Compile ``gemv_forward.c`` once per source and compiler; None if that is not possible."""
    compiler = _compiler()
    if compiler is None or not _SHIM_SOURCE.exists():
        return None
    # The machine type is in the name too: a cache directory may be a volume shared by images
    # of different architectures.
    key = _SHIM_SOURCE.read_bytes() + compiler.encode() + platform.machine().encode()
    tag = hashlib.sha256(key).hexdigest()[:16]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "moeserve"):
        target = directory / f"gemv_forward-{tag}.so"
        if target.exists():
            return target
        partial: Path | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # Build under a private name and rename, so that servers starting together never
            # load a half-written library.
            fd, name = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
            partial = Path(name)
            command = [compiler, "-O2", "-shared", "-fPIC", "-o", name, str(_SHIM_SOURCE)]
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            os.replace(partial, target)
            return target
        except (OSError, subprocess.SubprocessError):
            if partial is not None:
                partial.unlink(missing_ok=True)
    return None


def _load(path: str) -> str:
    """Load the BLAS at ``path`` globally, behind the gemv shim when it can be built.

    Args:
        path: The optimized BLAS library.

    Returns:
        The description for the startup line.
    """
    local = ctypes.CDLL(path)  # not global yet: first check it is a CBLAS with both routines
    wanted = os.environ.get("MOESERVE_BLAS_GEMV", "1") != "0"
    shim_path = _build_shim() if wanted and _has(local, "cblas_sgemm", "cblas_sgemv") else None
    if shim_path is not None:
        try:  # into the global scope before the BLAS, so that MLX's sgemm binds to the shim
            shim = ctypes.CDLL(str(shim_path), mode=os.RTLD_GLOBAL)
        except OSError:  # a corrupt or foreign file in the cache: go on without the shim
            pass
        else:
            shim.moeserve_blas_bind(
                ctypes.cast(local.cblas_sgemm, ctypes.c_void_p),
                ctypes.cast(local.cblas_sgemv, ctypes.c_void_p),
            )
            _state["shim"] = str(shim_path)
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    return f"{path} (matrix-vector products through sgemv)" if "shim" in _state else path


def _has(lib: ctypes.CDLL, *names: str) -> bool:
    return all(hasattr(lib, name) for name in names)


def blas_path() -> str | None:
    """The optimized BLAS library loaded in MLX's place, if any.

    Returns:
        Its path, or None when MLX keeps its bundled BLAS (or on macOS).
    """
    preload()
    return _state.get("path")


def gemv_forwarding() -> bool:
    """Whether one-row float32 products go to ``sgemv`` through the shim.

    Returns:
        True when the shim is loaded and bound.
    """
    return "shim" in _state


def forwarded_calls() -> int | None:
    """How many products the gemv shim has sent to sgemv, or None when it is not loaded.

    Returns:
        The count since the process started.
    """
    if "shim" not in _state:
        return None
    counter = ctypes.CDLL(_state["shim"]).moeserve_blas_forwarded
    counter.restype = ctypes.c_long
    return counter()


def preload() -> str:
    """Load an optimized BLAS globally if the platform, the setting and the timing allow.

    Returns:
        A description of the BLAS MLX will use.
    """
    if "blas" in _state:
        return _state["blas"]
    choice = os.environ.get("MOESERVE_BLAS", "auto")
    if sys.platform != "linux":
        _state["blas"] = "platform default (Accelerate on macOS)"
    elif choice == "none":
        _state["blas"] = _REFERENCE
    elif "mlx.core" in sys.modules:
        _state["blas"] = "unchanged (MLX was imported before moeserve could choose a BLAS)"
    else:
        path = _find() if choice == "auto" else choice
        try:
            if path is None:
                raise OSError("no optimized BLAS found")
            _state["blas"] = _load(path)
            _state["path"] = path
        except OSError:
            _state["blas"] = _REFERENCE
    return _state["blas"]


def blas_in_use() -> str:
    """Which BLAS MLX's CPU backend uses, for the startup line.

    Returns:
        A short description.
    """
    return _state.get("blas") or preload()
