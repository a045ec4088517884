"""The gemv shim (``models/backend/gemv_forward.c``): one-row and one-column products stay exact.

MLX binds its ``cblas_sgemm`` to the shim when moeserve loads an optimized BLAS; these tests
run only where that happened (Linux with OpenBLAS and a C compiler, as on CI). Each product
is checked against NumPy in float64, and the shim's counter proves the call really went
through ``sgemv`` rather than the BLAS's general product.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models.backend import blas
from moeserve.models.backend.blas import blas_in_use, blas_path, forwarded_calls, gemv_forwarding

pytestmark = pytest.mark.skipif(
    forwarded_calls() is None, reason="gemv shim not loaded (no optimized BLAS or compiler)"
)

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _check(result: mx.array, expected: np.ndarray, forwarded_before: int) -> None:
    got = np.array(result)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert forwarded_calls() > forwarded_before, "the product did not go through sgemv"


def test_state_reports_the_shim() -> None:
    assert gemv_forwarding()
    assert Path(blas_path()).is_file()  # what bench/compare.py preloads into mlx_lm.server
    assert blas_in_use().startswith(blas_path())
    assert "sgemv" in blas_in_use()  # the startup line says the shim is in use


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


def test_addmm_keeps_beta_and_alpha() -> None:
    c, a, b = _rand(1, 24), _rand(1, 64), _rand(24, 64)
    before = forwarded_calls()
    out = mx.addmm(mx.array(c), mx.array(a), mx.array(b).T, alpha=0.5, beta=2.0)
    _check(out, 0.5 * (a.astype(np.float64) @ b.T) + 2.0 * c, before)


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


def test_larger_products_are_not_forwarded() -> None:
    a, b = _rand(2, 64), _rand(64, 16)
    before = forwarded_calls()
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)
    assert forwarded_calls() == before


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
