"""The KV budget setting: its sources, its default from the machine's memory, and its uses.

``kv_cache_max_bytes`` is read like every setting (TOML < environment < flag) and refuses
negatives; unset, it derives from the memory figure (Metal's working set, else physical
memory), the weights and the prompt cache's budget (``server/kv_memory.py``). The longest
sequence a budget holds agrees exactly with the scheduler's admission rule, so the default
``max_tokens`` it caps is never refused; the metrics expose the engine's KV figures.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import moeserve.server.kv_memory as kv_memory
from moeserve.models.cache import BLOCK, CacheLayout, Full, Sliding
from moeserve.server import cli
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import KVBudget, KVBudgetError, Scheduler, SchedulerConfig
from moeserve.server.engine.sequence import Sequence
from moeserve.server.http.context_length import completion_limit
from moeserve.server.http.metrics import Metrics
from moeserve.server.kv_memory import (
    KV_MEMORY_FRACTION,
    default_kv_cache_bytes,
    device_memory,
    longest_row,
    resolve_kv_cache_max_bytes,
)
from moeserve.server.settings import Settings, SettingsError, load_settings

# 2 layers x (keys + values) x 2 heads x 16 dims x 4 bytes = 512 bytes a position.
FULL = CacheLayout([Full(2, 16), Full(2, 16)], itemsize=4)
MIXED = CacheLayout([Full(2, 16), Sliding(2, 16, sliding_window=40)], itemsize=4)
GiB = 2**30


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's MOESERVE_* variables must not leak into these tests."""
    for key in list(os.environ):
        if key.upper().startswith("MOESERVE_") and key != "MOESERVE_CACHE_DIR":
            monkeypatch.delenv(key)


# --- the setting ------------------------------------------------------------------------------


def test_unset_by_default_and_read_from_every_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text("kv_cache_max_bytes = 1000\n")
    assert Settings().kv_cache_max_bytes is None
    assert load_settings(toml).kv_cache_max_bytes == 1000
    monkeypatch.setenv("MOESERVE_KV_CACHE_MAX_BYTES", "2000")
    assert load_settings(toml).kv_cache_max_bytes == 2000
    assert load_settings(toml, kv_cache_max_bytes="0").kv_cache_max_bytes == 0


def test_the_serve_flag_is_generated() -> None:
    args = cli.build_parser().parse_args(["serve", "--kv-cache-max-bytes", "4096"])
    assert args.kv_cache_max_bytes == "4096"  # strings: pydantic validates them


@pytest.mark.parametrize("value", ["-1", "1.5", "lots"])
def test_a_bad_value_is_refused_naming_the_setting(value: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(None, kv_cache_max_bytes=value)
    assert refused.value.settings == ("kv_cache_max_bytes",)
    assert "--kv-cache-max-bytes" in str(refused.value)


# --- the machine's memory -----------------------------------------------------------------


def test_metal_uses_the_recommended_working_set(monkeypatch: pytest.MonkeyPatch) -> None:
    info = {"memory_size": 64 * GiB, "max_recommended_working_set_size": 48 * GiB}
    monkeypatch.setattr(kv_memory, "is_cpu", lambda: False)
    monkeypatch.setattr(kv_memory.mx, "device_info", lambda: info)
    assert device_memory() == 48 * GiB
    del info["max_recommended_working_set_size"]
    assert device_memory() == 64 * GiB


def test_the_cpu_uses_physical_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = {"SC_PHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(kv_memory, "is_cpu", lambda: True)
    monkeypatch.setattr(kv_memory.mx, "device_info", lambda: pytest.fail("not on the CPU"))
    monkeypatch.setattr(kv_memory.os, "sysconf", lambda name: figures[name])
    assert device_memory() == 4096 * 1000


def test_a_gpu_without_a_memory_figure_falls_back_to_physical_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kv_memory, "is_cpu", lambda: False)
    monkeypatch.setattr(kv_memory.mx, "device_info", lambda: {"device_name": "x"})
    monkeypatch.setattr(kv_memory.os, "sysconf", lambda name: 8 if name == "SC_PAGE_SIZE" else 3)
    assert device_memory() == 24


def test_unknown_memory_means_no_byte_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_sysconf(name: str) -> int:
        raise ValueError(name)

    monkeypatch.setattr(kv_memory, "is_cpu", lambda: True)
    monkeypatch.setattr(kv_memory.os, "sysconf", no_sysconf)
    assert device_memory() is None
    with caplog.at_level(logging.WARNING):
        assert _resolve(None, memory=None) is None
    assert "kv_cache_max_bytes" in caplog.text


# --- the default ----------------------------------------------------------------------------


def _resolve(setting: int | None, memory: int | None, **kw: int) -> int | None:
    args = {"weights": GiB, "prompt_cache": 2 * GiB, "max_model_len": 4096, "prefill_chunk": 512}
    return resolve_kv_cache_max_bytes(setting, FULL, memory=memory, **{**args, **kw})


def test_the_default_is_half_of_what_the_weights_and_prompt_cache_leave() -> None:
    assert KV_MEMORY_FRACTION == 0.5
    assert default_kv_cache_bytes(16 * GiB, 4 * GiB, 2 * GiB, one_row=GiB) == 5 * GiB
    assert _resolve(None, memory=16 * GiB) == int((16 - 1 - 2) * GiB * 0.5)
    assert _resolve(None, memory=16 * GiB, prompt_cache=0) == int(15 * GiB * 0.5)


def test_the_default_holds_one_full_length_sequence_when_memory_allows() -> None:
    # The prompt cache's budget leaves nothing, but one 4096-token row fits beside the weights.
    one_row = FULL.row_bytes(4096, 512)
    assert one_row == 4096 * 512
    assert default_kv_cache_bytes(3 * GiB, GiB, 2 * GiB, one_row) == one_row
    # Less than one row beside the weights: all of it, then; nothing at all: one row anyway.
    assert default_kv_cache_bytes(GiB + 1000, GiB, 0, one_row) == 1000
    assert default_kv_cache_bytes(GiB, 2 * GiB, 0, one_row) == one_row


def test_zero_or_an_explicit_value_overrides(caplog: pytest.LogCaptureFixture) -> None:
    assert _resolve(0, memory=16 * GiB) is None  # no byte bound
    assert _resolve(123_456_789, memory=16 * GiB) == 123_456_789
    with caplog.at_level(logging.WARNING):
        assert _resolve(64 * 512, memory=None) == 64 * 512  # explicit: no memory needed
    assert "at most 64 tokens" in caplog.text and "max_model_len is 4096" in caplog.text


# --- the longest sequence a budget holds ----------------------------------------------------


def _admits(layout: CacheLayout, max_bytes: int, prompt: int, max_tokens: int) -> bool:
    scheduler = Scheduler(
        SchedulerConfig(max_batched_tokens=32, prefill_chunk=32, max_model_len=10_000),
        KVBudget(layout, max_bytes),
    )
    params = SamplingParams(max_tokens=max_tokens)
    try:
        scheduler.add([Sequence("r", 0, list(range(1, prompt + 1)), params)])
    except KVBudgetError:
        return False
    return True


@pytest.mark.parametrize("layout", [FULL, MIXED], ids=["full", "sliding"])
@pytest.mark.parametrize("blocks", [1, 3, 7])
def test_the_longest_row_is_exactly_what_the_scheduler_admits(
    layout: CacheLayout, blocks: int
) -> None:
    max_bytes = blocks * layout.block_bytes + 100
    longest = longest_row(layout, max_bytes, prefill_chunk=32, limit=10_000)
    assert 0 < longest < 10_000
    assert _admits(layout, max_bytes, 1, longest - 1)
    assert not _admits(layout, max_bytes, 1, longest)
    if layout is FULL:
        assert longest == blocks * BLOCK


def test_a_budget_too_small_for_one_block_holds_nothing() -> None:
    assert longest_row(FULL, FULL.block_bytes - 1, prefill_chunk=32, limit=100) == 0
    assert longest_row(FULL, 10**12, prefill_chunk=32, limit=100) == 100


def _runtime(budget: KVBudget | None) -> SimpleNamespace:
    settings = SimpleNamespace(default_max_tokens=1000, prefill_chunk=32)
    return SimpleNamespace(max_model_len=4096, settings=settings, kv_budget=budget)


def test_the_default_max_tokens_fits_the_budget() -> None:
    budget = KVBudget(FULL, 10 * FULL.block_bytes)  # 160 positions
    assert completion_limit(_runtime(None), 100, None) == 1000
    limit = completion_limit(_runtime(budget), 100, None)
    assert limit == 60 and _admits(FULL, budget.max_bytes, 100, limit)
    assert completion_limit(_runtime(budget), 10, 500) == 500  # a requested one is the engine's
    # A prompt over the budget by itself: 1, which the engine refuses naming the setting.
    assert completion_limit(_runtime(budget), 170, None) == 1


# --- metrics ----------------------------------------------------------------------------------


def _scrape(metrics: Metrics) -> dict[str, float]:
    values = {}
    for line in metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_read_the_engines_kv_figures() -> None:
    stats = {"running": 1, "waiting": 0, "kv_cache_bytes": 8192, "kv_cache_tokens": 9}
    metrics = Metrics(lambda: stats, kv_cache_max_bytes=65536)
    stats["preemptions"] = 3
    values = _scrape(metrics)
    assert values["moeserve_kv_cache_bytes"] == 8192
    assert values["moeserve_kv_cache_tokens"] == 9
    assert values["moeserve_kv_cache_max_bytes"] == 65536
    assert values["moeserve_preemptions_total"] == 3
    stats["preemptions"] = 5  # read at each scrape, not copied
    assert _scrape(metrics)["moeserve_preemptions_total"] == 5
    assert "# TYPE moeserve_preemptions_total counter" in metrics.render().decode()


def test_without_a_budget_there_is_no_max_gauge_and_missing_stats_read_zero() -> None:
    values = _scrape(Metrics(lambda: {"running": 0, "waiting": 0}))
    assert "moeserve_kv_cache_max_bytes" not in values
    assert values["moeserve_kv_cache_bytes"] == 0 and values["moeserve_preemptions_total"] == 0
