"""Use an optimized BLAS under MLX's Linux CPU backend.

MLX's Linux CPU wheel bundles the reference BLAS, whose float32 matmul runs at a few
GFLOP/s; OpenBLAS on the same machine is 15-30x faster. MLX's ``libmlx.so`` leaves
``cblas_sgemm`` (and ``cblas_dgemm``, ``cblas_cgemm``) undefined, so whatever provides them in
the process's global symbol scope *before* MLX's shared library is loaded is what MLX calls:
the same effect as ``LD_PRELOAD``, without asking the user to set it. After ``mlx.core`` is
imported it is too late, so this runs first thing in ``models/backend/__init__.py``.

Two OpenBLAS builds are used (bench/RESULTS.md, section 9, measures them):

* The system OpenBLAS (``apt-get install libopenblas0-pthread``), loaded globally as it is.
  Before 0.3.27 (Debian 12 has 0.3.21) OpenBLAS runs one-row products (every single-stream
  decode step) as general products that repack each weight matrix, 2-5x slower than its own
  sgemv; the same shim sends them to ``cblas_sgemv``. Preferred when installed: it measured
  faster at batch-1 decoding than the wheel.
* ``scipy-openblas32``, a pip dependency on Linux (OpenBLAS 0.3.34). Its symbols carry a
  ``scipy_`` prefix, so it cannot stand in for MLX's BLAS by itself: a small C shim,
  ``gemv_forward.c``, defines the three ``cblas_*gemm`` symbols and forwards them to it. It
  is what a machine without root gets.

The shim is compiled once with the system C compiler into moeserve's cache directory
(``MOESERVE_CACHE_DIR``, else ``~/.cache/moeserve``; the temp directory when neither is
writable). Without a compiler the wheel cannot be used and the system OpenBLAS runs without
the shim; with neither, MLX keeps its reference BLAS, and the startup line says so.

A BLAS that is already in the process (``LD_PRELOAD``) wins over anything loaded here: it is
detected, used as it is, and the startup line says what that costs.

macOS uses Accelerate and Metal and is left alone. ``MOESERVE_BLAS`` selects: ``auto``
(default: the system OpenBLAS, else the wheel), ``wheel``, ``system``, ``none`` (keep the
bundled one), or a library path. ``MOESERVE_BLAS_GEMV=0`` turns the one-row rerouting off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
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

# The symbol prefixes a BLAS may carry: none (system builds) or the scipy-openblas wheels'.
_PREFIXES = ("", "scipy_")

# What the startup line says when MLX keeps its own BLAS: why, and the one command that fixes it.
_FIX = "pip install scipy-openblas32"
_REFERENCE = f"reference BLAS bundled with MLX (about 25x slower on matrix products; {_FIX})"
_NO_COMPILER = (
    "reference BLAS bundled with MLX (about 25x slower on matrix products): scipy-openblas32 "
    "needs a C compiler for its shim; apt-get install gcc (or set CC)"
)
_state: dict[str, str] = {}


def _find_system() -> str | None:
    for candidate in _CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return ctypes.util.find_library("openblas")


def _find_wheel() -> str | None:
    """The scipy-openblas32 library, found without importing the package (which loads it)."""
    try:
        spec = importlib.util.find_spec("scipy_openblas32")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted((Path(location) / "lib").glob("libscipy_openblas*.so*"))
        if found:
            return str(found[0])
    return None


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


class _NoShimError(OSError):
    """A prefixed BLAS was chosen but the shim it needs could not be built or loaded."""


def _prefix(lib: ctypes.CDLL) -> str | None:
    """The prefix of ``lib``'s CBLAS symbols, or None when it has no ``cblas_sgemm``."""
    return next((p for p in _PREFIXES if _has(lib, f"{p}cblas_sgemm")), None)


def _load(path: str) -> str:
    """Load the BLAS at ``path`` in MLX's place, behind the gemv shim when it can be built.

    Args:
        path: The optimized BLAS library.

    Returns:
        The description for the startup line.

    Raises:
        OSError: The library cannot be loaded, is not a CBLAS, or needs the shim and there is
            none (``_NoShimError``).
    """
    local = ctypes.CDLL(path)  # not global yet: first see which symbols it has
    prefix = _prefix(local)
    if prefix is None:
        raise OSError(f"{path} has no cblas_sgemm")
    names = [f"{prefix}cblas_{n}" for n in ("sgemm", "sgemv", "dgemm", "cgemm")]
    reroute = os.environ.get("MOESERVE_BLAS_GEMV", "1") != "0"
    # Unprefixed, the BLAS binds MLX by itself and the shim is only worth it for the rerouting;
    # prefixed, MLX can reach the BLAS through the shim only.
    needed = bool(prefix) or reroute
    shim_path = _build_shim() if needed and _has(local, *names) else None
    if shim_path is not None:
        try:  # into the global scope before the BLAS, so that MLX's sgemm binds to the shim
            shim = ctypes.CDLL(str(shim_path), mode=os.RTLD_GLOBAL)
        except OSError:  # a corrupt or foreign file in the cache: go on without the shim
            pass
        else:
            sgemm, sgemv, dgemm, cgemm = (
                ctypes.cast(getattr(local, name), ctypes.c_void_p) for name in names
            )
            shim.moeserve_blas_bind(sgemm, sgemv if reroute else None, dgemm, cgemm)
            _state["shim"] = str(shim_path)
            if reroute:
                _state["gemv"] = "1"
            _split_threads(shim, local, prefix)
    if prefix and "shim" not in _state:
        raise _NoShimError(f"no shim for {path}")
    if not prefix:
        # Global: MLX's cblas_dgemm/cgemm (and its bundled LAPACK's Fortran BLAS calls) then
        # bind to it too. A prefixed one is reached through the shim only.
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    version = _version(local, prefix)
    what = f"{path}{f' ({version})' if version else ''}"
    what = f"{what}, matrix-vector products through sgemv" if "gemv" in _state else what
    return f"{what}; {_state['split']}" if "split" in _state else what


def _split_threads(shim: ctypes.CDLL, lib: ctypes.CDLL, prefix: str) -> None:
    """``MOESERVE_BLAS_SPLIT_ROWS=n``: products of at most n rows on one OpenBLAS thread.

    Decode-sized products lose more to OpenBLAS's spinning hand-over than a second thread
    gives them, prefill-sized ones gain (bench/RESULTS.md, section 19). Unset or 0: OpenBLAS
    threads every product as it decides (``OPENBLAS_NUM_THREADS`` still applies).
    """
    value = os.environ.get("MOESERVE_BLAS_SPLIT_ROWS", "0") or "0"
    try:
        rows = int(value)
    except ValueError:  # at import, before logging: the startup line's warning says it
        _state["warning"] = (
            f"BLAS: MOESERVE_BLAS_SPLIT_ROWS={value!r} is not a whole number; ignored"
        )
        return
    setter, getter = f"{prefix}openblas_set_num_threads", f"{prefix}openblas_get_num_threads"
    if rows <= 0 or not _has(lib, setter, getter):
        return
    threads = getattr(lib, getter)()
    if threads > 1:
        setter_address = ctypes.cast(getattr(lib, setter), ctypes.c_void_p)
        shim.moeserve_blas_threads(setter_address, threads, rows)
        _state["split"] = f"products of up to {rows} rows on 1 of {threads} threads"


def _has(lib: ctypes.CDLL, *names: str) -> bool:
    return all(hasattr(lib, name) for name in names)


def _version(lib: ctypes.CDLL, prefix: str = "") -> str | None:
    """OpenBLAS's version (``"OpenBLAS 0.3.21"``), or None for another BLAS."""
    name = f"{prefix}openblas_get_config"
    if not hasattr(lib, name):
        return None
    config = getattr(lib, name)
    config.restype = ctypes.c_char_p
    words = (config() or b"").decode(errors="replace").split()
    return " ".join(words[:2]) if words else None


class _DlInfo(ctypes.Structure):
    # ctypes' own layout declaration, not a mutable class default.
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _already_bound() -> str | None:
    """The library that already provides ``cblas_sgemm`` to the whole process, if any.

    Something in the process's initial symbol scope (an ``LD_PRELOAD`` library, or one the
    interpreter was linked with) takes precedence over anything loaded later with
    ``RTLD_GLOBAL``, so MLX will bind to it whatever is chosen here.

    Returns:
        Its path (or ``LD_PRELOAD`` itself when the path cannot be told), or None.
    """
    process = ctypes.CDLL(None)
    if not hasattr(process, "cblas_sgemm"):
        return None
    info = _DlInfo()
    dladdr = process.dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
    if dladdr(address, ctypes.byref(info)) and info.dli_fname:
        return info.dli_fname.decode(errors="replace")
    return os.environ.get("LD_PRELOAD") or "an already loaded library"


def _preloaded(path: str) -> str:
    """The startup line's description of a BLAS someone else put in MLX's place."""
    try:
        version = _version(ctypes.CDLL(path))
    except OSError:
        version = None
    what = f"{path}{f' ({version})' if version else ''} from LD_PRELOAD, as it is"
    if version and version.startswith("OpenBLAS "):
        numbers = tuple(int(n) for n in version.split()[1].split(".")[:3] if n.isdigit())
        if numbers >= (0, 3, 27):
            return f"{what} (it sends one-row products to sgemv itself)"
    # moeserve's shim cannot go in front of a preloaded library: say what that costs.
    _state["warning"] = (
        f"BLAS: {path} is preloaded (LD_PRELOAD), so moeserve's sgemv shim cannot route one-row "
        "products: single-stream decoding is ~1.5-2x slower; unset LD_PRELOAD to let moeserve "
        "choose"
    )
    return (
        f"{what}: one-row products run as general products, not through moeserve's sgemv "
        "shim (decode ~1.5-2x slower); unset LD_PRELOAD to let moeserve choose"
    )


def blas_path() -> str | None:
    """The optimized BLAS library loaded in MLX's place, if any.

    Returns:
        Its path, or None when MLX keeps its bundled BLAS (or on macOS).
    """
    preload()
    return _state.get("path")


def preloadable() -> bool:
    """Whether ``blas_path()`` can be handed to another MLX process through ``LD_PRELOAD``.

    Returns:
        False for a prefixed BLAS (the scipy-openblas32 wheel), which MLX reaches only through
        the shim.
    """
    path = blas_path()
    return path is not None and _prefix(ctypes.CDLL(path)) == ""


def gemv_forwarding() -> bool:
    """Whether one-row float32 products go to ``sgemv`` through the shim.

    Returns:
        True when the shim is loaded and bound with rerouting on.
    """
    return "gemv" in _state


def forwarded_calls() -> int | None:
    """How many products the gemv shim has sent to sgemv, or None when it is not rerouting.

    Returns:
        The count since the process started.
    """
    if "gemv" not in _state:
        return None
    counter = ctypes.CDLL(_state["shim"]).moeserve_blas_forwarded
    counter.restype = ctypes.c_long
    return counter()


def _candidates(choice: str) -> list[str | None]:
    if choice == "auto":
        # The system OpenBLAS first: with the shim it decodes faster than the wheel here
        # (bench/RESULTS.md, section 9); the wheel is what every pip install has.
        return [_find_system(), _find_wheel()]
    if choice == "wheel":
        return [_find_wheel()]
    if choice == "system":
        return [_find_system()]
    return [choice]


def preload() -> str:
    """Load an optimized BLAS globally if the platform, the setting and the timing allow.

    Returns:
        A description of the BLAS MLX will use.
    """
    if "blas" in _state:
        return _state["blas"]
    choice = os.environ.get("MOESERVE_BLAS", "auto")
    bound = _already_bound() if sys.platform == "linux" else None
    if sys.platform != "linux":
        _state["blas"] = "platform default (Accelerate on macOS)"
    elif bound is not None:
        _state["blas"] = _preloaded(bound)
        _state["path"] = bound
    elif choice == "none":
        _state["blas"] = "reference BLAS bundled with MLX (MOESERVE_BLAS=none)"
    elif "mlx.core" in sys.modules:
        _state["blas"] = "unchanged (MLX was imported before moeserve could choose a BLAS)"
    else:
        _state["blas"] = _REFERENCE
        for path in _candidates(choice):
            if path is None:
                continue
            try:
                _state["blas"] = _load(path)
            except _NoShimError:
                _state["blas"] = _NO_COMPILER
                continue
            except OSError:
                continue
            _state["path"] = path
            break
        else:  # nothing loaded: make sure it is heard, not only in the summary line
            _state["warning"] = f"BLAS: {_state['blas']}"
    return _state["blas"]


def blas_warning() -> str | None:
    """What to log as a warning at startup about the BLAS, if anything.

    Returns:
        A line when MLX runs on its reference BLAS without being told to (``MOESERVE_BLAS``
        other than ``none``), or when a preloaded BLAS bypasses the gemv shim; else None.
    """
    preload()
    return _state.get("warning")


def blas_in_use() -> str:
    """Which BLAS MLX's CPU backend uses, for the startup line.

    Returns:
        A short description.
    """
    return _state.get("blas") or preload()
