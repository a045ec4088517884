"""The gemv shim (``models/backend/gemv_forward.c``): one-row and one-column products stay exact.

MLX binds its ``cblas_sgemm`` to the shim when moeserve loads an optimized BLAS; the in-process
tests run only where that happened (Linux with a C compiler, as on CI, where the BLAS is the
scipy-openblas32 wheel). Each BLAS choice is then checked in its own process, since the choice
is made before MLX loads, as are the startup wording and the ``LD_PRELOAD`` detection. Each product
is checked against NumPy in float64, and the shim's counter proves the call really went
through ``sgemv`` rather than the BLAS's general product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models.backend import blas
from moeserve.models.backend.blas import blas_in_use, blas_path, forwarded_calls, gemv_forwarding

needs_shim = pytest.mark.skipif(
    forwarded_calls() is None, reason="gemv shim not loaded (no optimized BLAS or compiler)"
)
needs_compiler = pytest.mark.skipif(blas._compiler() is None, reason="no C compiler")

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _check(result: mx.array, expected: np.ndarray, forwarded_before: int) -> None:
    got = np.array(result)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert forwarded_calls() > forwarded_before, "the product did not go through sgemv"


@needs_shim
def test_state_reports_the_shim() -> None:
    assert gemv_forwarding()
    assert Path(blas_path()).is_file()  # what bench/compare.py preloads into mlx_lm.server
    assert blas_in_use().startswith(blas_path())
    assert "sgemv" in blas_in_use()  # the startup line says the shim is in use


@needs_shim
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize(
    "shapes", [((1, 96), (96, 40)), ((40, 96), (96, 1))], ids=["row", "column"]
)
def test_one_row_and_one_column_products(shapes, transpose_a: bool, transpose_b: bool) -> None:
    a, b = _rand(*shapes[0]), _rand(*shapes[1])
    # Transposed operands are MLX views over the transposed storage: the BLAS sees a
    # Trans flag and the stored matrix's leading dimension.
    ma = mx.array(np.ascontiguousarray(a.T)).T if transpose_a else mx.array(a)
    mb = mx.array(np.ascontiguousarray(b.T)).T if transpose_b else mx.array(b)
    before = forwarded_calls()
    _check(ma @ mb, a.astype(np.float64) @ b, before)


@needs_shim
def test_addmm_keeps_beta_and_alpha() -> None:
    c, a, b = _rand(1, 24), _rand(1, 64), _rand(24, 64)
    before = forwarded_calls()
    out = mx.addmm(mx.array(c), mx.array(a), mx.array(b).T, alpha=0.5, beta=2.0)
    _check(out, 0.5 * (a.astype(np.float64) @ b.T) + 2.0 * c, before)


@needs_shim
def test_batched_and_gathered_one_row_products() -> None:
    x, w = _rand(3, 1, 64), _rand(5, 32, 64)
    before = forwarded_calls()
    _check(mx.array(x) @ mx.array(w[:3]).swapaxes(-1, -2), x @ w[:3].swapaxes(-1, -2), before)
    inds = np.array([[4, 0], [2, 2], [1, 3]], dtype=np.int32)  # two experts per token
    got = mx.gather_mm(
        mx.array(x)[:, None], mx.array(w).swapaxes(-1, -2), rhs_indices=mx.array(inds)
    )
    expected = np.einsum("tk,tank->tan", x[:, 0].astype(np.float64), w[inds])[:, :, None]
    _check(got, expected, before)


@needs_shim
def test_output_buffer_garbage_is_ignored() -> None:
    """MLX hands the BLAS recycled buffers; with beta = 0 their old contents must not leak.

    Whether ``sgemv`` itself ignores NaN in y when beta = 0 depends on the OpenBLAS version;
    the shim clears y first so that it does not matter.
    """
    a, b = _rand(1, 128), _rand(128, 256)
    for _ in range(3):
        poison = mx.full((1, 256), float("nan"))
        mx.eval(poison)
        del poison  # back to MLX's buffer cache, to be reused for the product's output
        before = forwarded_calls()
        _check(mx.array(a) @ mx.array(b), a.astype(np.float64) @ b, before)


@needs_shim
def test_larger_products_are_not_forwarded() -> None:
    a, b = _rand(2, 64), _rand(64, 16)
    before = forwarded_calls()
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)
    assert forwarded_calls() == before


@needs_shim
def test_shim_is_built_once_into_the_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    built = blas._build_shim()
    assert built is not None and built.parent == tmp_path and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert blas._build_shim() == built  # found, not rebuilt
    assert built.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no partial files left


def test_no_compiler_means_no_shim(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(blas.shutil, "which", lambda _name: None)
    assert blas._build_shim() is None


# --- each BLAS choice in a fresh process ----------------------------------------------------

_PRODUCTS = """
import json
import numpy as np
from moeserve.models.backend import blas
import mlx.core as mx

rng = np.random.default_rng(0)
a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((1, 96), (96, 40), (40, 96)))
big = rng.standard_normal((64, 96)).astype(np.float32)
before = blas.forwarded_calls() or 0
cases = {
    "row": (mx.array(a) @ mx.array(b), a.astype(np.float64) @ b),
    "row_bt": (mx.array(a) @ mx.array(np.ascontiguousarray(b.T)).T, a.astype(np.float64) @ b),
    "column": (mx.array(c) @ mx.array(a).T, c.astype(np.float64) @ a.T),
    "general": (mx.array(big) @ mx.array(b), big.astype(np.float64) @ b),
}
errors = {k: float(np.abs(np.array(got) - want).max()) for k, (got, want) in cases.items()}
print(json.dumps({
    "blas": blas.blas_in_use(), "path": blas.blas_path(), "errors": errors,
    "forwarded": (blas.forwarded_calls() or 0) - before, "warning": blas.blas_warning(),
}))
"""


def _run(code: str, tmp_path: Path, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MOESERVE_BLAS")}
    base.pop("LD_PRELOAD", None)
    base["MOESERVE_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wheel_or_skip() -> str:
    path = blas._find_wheel()
    if path is None:
        pytest.skip("scipy-openblas32 is not installed")
    return path


@needs_compiler
@pytest.mark.parametrize("gemv", ["1", "0"])
def test_wheel_through_the_prefixed_symbols_matches_numpy(tmp_path, gemv: str) -> None:
    """scipy-openblas32 exports only ``scipy_cblas_*``: MLX reaches it through the shim."""
    path = _wheel_or_skip()
    out = _run(_PRODUCTS, tmp_path, MOESERVE_BLAS="wheel", MOESERVE_BLAS_GEMV=gemv)
    assert out["path"] == path and "OpenBLAS 0.3." in out["blas"]
    assert max(out["errors"].values()) < 1e-3
    # Three one-row/one-column products rerouted, the general one not; none with GEMV=0.
    assert out["forwarded"] == (3 if gemv == "1" else 0)
    assert ("sgemv" in out["blas"]) == (gemv == "1")
    assert out["warning"] is None


@needs_compiler
def test_system_openblas_stays_an_option(tmp_path) -> None:
    if blas._find_system() is None:
        pytest.skip("no system OpenBLAS")
    out = _run(_PRODUCTS, tmp_path, MOESERVE_BLAS="system")
    assert out["path"] == blas._find_system() and "sgemv" in out["blas"]
    assert max(out["errors"].values()) < 1e-3 and out["forwarded"] == 3


def test_no_optimized_blas_says_so_with_the_fix(tmp_path) -> None:
    out = _run(_PRODUCTS, tmp_path, MOESERVE_BLAS="/nonexistent/libopenblas.so.0")
    assert out["path"] is None and max(out["errors"].values()) < 1e-3
    assert out["blas"] == blas._REFERENCE
    assert "25x slower" in out["blas"] and "pip install scipy-openblas32" in out["blas"]
    assert out["warning"] == f"BLAS: {blas._REFERENCE}"  # logged as a warning at startup


def test_wheel_without_a_compiler_says_why(tmp_path) -> None:
    _wheel_or_skip()
    # No cc, gcc or clang on PATH: the interpreter runs by its absolute path.
    out = _run(_PRODUCTS, tmp_path, MOESERVE_BLAS="wheel", PATH=str(tmp_path), CC="")
    assert out["path"] is None and out["blas"] == blas._NO_COMPILER
    assert "C compiler" in out["warning"]


def test_chosen_blas_is_not_reported_as_a_problem(tmp_path) -> None:
    out = _run(_PRODUCTS, tmp_path, MOESERVE_BLAS="none")
    assert "MOESERVE_BLAS=none" in out["blas"] and out["warning"] is None


@needs_compiler
def test_preloaded_blas_is_detected(tmp_path) -> None:
    """Whatever ``LD_PRELOAD`` brings wins over the shim: the startup line must say so.

    The shim itself stands in for a preloaded CBLAS (it exports ``cblas_sgemm``); nothing is
    multiplied, since nothing bound it to a BLAS.
    """
    shim = blas._build_shim()
    assert shim is not None
    code = (
        "import json\nfrom moeserve.models.backend import blas\n"
        "print(json.dumps({'blas': blas.blas_in_use(), 'path': blas.blas_path(),"
        " 'warning': blas.blas_warning(), 'gemv': blas.gemv_forwarding()}))"
    )
    out = _run(code, tmp_path, LD_PRELOAD=str(shim))
    assert out["path"] == str(shim) and not out["gemv"]
    assert "LD_PRELOAD" in out["blas"] and "unset LD_PRELOAD" in out["blas"]
    assert "LD_PRELOAD" in out["warning"]


_SPLIT = """
import ctypes, json
import numpy as np
from moeserve.models.backend import blas
import mlx.core as mx

rng = np.random.default_rng(1)
w = rng.standard_normal((256, 256)).astype(np.float32)
small, large = (rng.standard_normal((n, 256)).astype(np.float32) for n in (8, 200))
shim = ctypes.CDLL(blas._state["shim"]) if "shim" in blas._state else None
count = (lambda: shim.moeserve_blas_single_threaded()) if shim else (lambda: 0)
out = {"blas": blas.blas_in_use()}
for name, x in (("small", small), ("large", large)):
    before = count()
    got = np.array(mx.array(x) @ mx.array(w))
    out[name] = {"single": count() - before, "values": got.tobytes().hex()}
print(json.dumps(out))
"""


@needs_compiler
def test_split_rows_runs_decode_sized_products_on_one_thread(tmp_path) -> None:
    _wheel_or_skip()
    env = {"MOESERVE_BLAS": "wheel", "OPENBLAS_NUM_THREADS": "2"}
    split = _run(_SPLIT, tmp_path, MOESERVE_BLAS_SPLIT_ROWS="32", **env)
    plain = _run(_SPLIT, tmp_path, **env)
    assert "products of up to 32 rows on 1 of 2 threads" in split["blas"]
    assert split["small"]["single"] == 1 and split["large"]["single"] == 0
    assert plain["small"]["single"] == plain["large"]["single"] == 0
    # The thread count decides who computes which part, not how: the products are the same.
    for size in ("small", "large"):
        assert split[size]["values"] == plain[size]["values"]


@needs_compiler
def test_a_split_rows_value_that_is_not_a_number_is_named_and_ignored(tmp_path) -> None:
    _wheel_or_skip()
    env = {"MOESERVE_BLAS": "wheel", "OPENBLAS_NUM_THREADS": "2"}
    out = _run(_SPLIT, tmp_path, MOESERVE_BLAS_SPLIT_ROWS="lots", **env)
    assert "rows on 1 of" not in out["blas"]
    assert out["small"]["single"] == 0
    code = _SPLIT.replace('"blas": blas.blas_in_use()', '"blas": blas.blas_warning()')
    warning = _run(code, tmp_path, MOESERVE_BLAS_SPLIT_ROWS="lots", **env)["blas"]
    assert "MOESERVE_BLAS_SPLIT_ROWS='lots' is not a whole number; ignored" in warning
