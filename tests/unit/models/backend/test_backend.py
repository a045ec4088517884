"""moeserve.models.backend: the one place that asks which device MLX runs on, and the swap."""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models import backend
from moeserve.models.backend import Backend, CpuBackend


def test_the_device_picks_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert backend.is_cpu() and isinstance(backend.current(), CpuBackend)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert not backend.is_cpu()
    assert type(backend.current()) is Backend  # Metal: MLX's own ops
    assert backend.kernels() == "GPU kernels" and not backend.fast_math_in_use()


def test_use_swaps_and_restores_even_nested() -> None:
    default = backend.current()
    outer, inner = CpuBackend(fast_math=False), Backend()
    with backend.use(outer):
        assert backend.current() is outer
        with backend.use(inner):
            assert backend.current() is inner
        assert backend.current() is outer
    assert backend.current() is default


def test_forward_pass_scopes_nest() -> None:
    cpu = CpuBackend()
    with cpu.forward_pass():
        tables = cpu._tables
        with cpu.forward_pass():
            assert cpu._tables is not tables
        assert cpu._tables is tables
    assert cpu._tables is None
