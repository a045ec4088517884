"""The engine under a KV byte budget and with quantized KV, on real tiny Qwen2-MoE checkpoints.

Preemption must never change an output (greedy or seeded), the budget must hold at every
step, and quantized storage must cut the bytes per token while staying close to the
float cache's logits. Speed is measured in ``bench/``, never here.
"""

from __future__ import annotations

import asyncio
import time

import mlx.core as mx
import pytest

from moeserve.devtools.demo import CheckpointSpec, build_checkpoint
from moeserve.models import load
from moeserve.models.cache import CacheStore, SequenceCache
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.scheduler import KVBudgetError, SchedulerConfig
from moeserve.server.text.tokenizer import Tokenizer
from tests.unit.server.engine.test_engine import _collect, _prompts, _request


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("demo"), CheckpointSpec(seed=3))
    return load(path).model, Tokenizer.from_dir(path), path


def _engine(demo, **kw) -> Engine:
    model, tokenizer, _ = demo
    config = SchedulerConfig(
        max_running=16, max_batched_tokens=64, prefill_chunk=16, max_model_len=512
    )
    engine = Engine(model, tokenizer, config, **kw)
    engine.start()
    return engine


def _run_all(engine: Engine, requests) -> list[list[int]]:
    async def together():
        return await asyncio.gather(*(_collect(engine, r, 2 * i) for i, r in enumerate(requests)))

    return [r[1][0] for r in asyncio.run(together())]


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True},
        {"temperature": 1.0, "top_p": 0.9, "max_tokens": 40, "ignore_eos": True, "seed": 11},
    ],
    ids=["greedy", "seeded"],
)
def test_preempted_sequences_produce_what_an_uninterrupted_run_does(demo, params) -> None:
    prompts = _prompts(demo[1])[:6]
    free = _engine(demo)
    try:
        expected = [asyncio.run(_collect(free, _request(p, **params)))[1][0] for p in prompts]
    finally:
        free.shutdown()
    per_token = free.runner.store.layout.bytes_per_token
    # Room for the longest sequence and a little more: six rows cannot all grow at once.
    longest = max(len(p) for p in prompts) + params["max_tokens"]
    budget = per_token * 16 * (-(-longest // 16) + 4)
    engine = _engine(demo, kv_cache_max_bytes=budget)
    peaks: list[int] = []
    step = engine.step

    def measured_step() -> None:
        step()
        peaks.append(engine.runner.store.nbytes)

    engine.step = measured_step
    try:
        got = _run_all(engine, [_request(p, **params) for p in prompts])
        for _ in range(1000):  # the last rows are freed by the step after they finish
            if not engine.scheduler.has_work:
                break
            time.sleep(0.005)
    finally:
        engine.shutdown()
    assert engine.runner.store.tokens == 0 and engine.runner.store.nbytes == 0
    assert engine.scheduler.preemptions > 0, "the budget never forced a preemption"
    assert max(peaks) <= budget
    assert got == expected


def test_a_request_that_can_never_fit_is_refused_and_others_run(demo) -> None:
    engine = _engine(demo, kv_cache_max_bytes=10_000)
    prompt = _prompts(demo[1])[0]
    try:
        with pytest.raises(KVBudgetError, match="kv_cache_max_bytes"):
            asyncio.run(_collect(engine, _request(prompt, max_tokens=400)))
        per_token = engine.runner.store.layout.bytes_per_token
        fits = 10_000 // per_token // 16 * 16 - len(prompt)
        out = asyncio.run(_collect(engine, _request(prompt, max_tokens=fits, ignore_eos=True)))
        assert len(out[1][0]) == fits and engine.healthy
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    # Heads of 32: the narrowest that MLX's quantization groups (32 values) divide.
    spec = CheckpointSpec(seed=5, hidden_size=128, init_scale=0.5)
    return load(build_checkpoint(tmp_path_factory.mktemp("wide"), spec)).model


@pytest.mark.parametrize("bits, tolerance", [(8, 0.05), (4, 0.6)])
def test_quantized_kv_stays_close_and_costs_less(wide, bits, tolerance) -> None:
    prompt = mx.array([[5, 17, 42, 8, 60, 11, 5, 99, 3, 7, 250, 31, 12, 9, 40, 2, 77]])
    layout = wide.cache_layout()
    exact, quant = (
        wide.make_cache(),
        SequenceCache(CacheStore(layout.quantized(bits), wide.cache_dtype())),
    )
    a, b = wide(prompt, cache=exact)[:, -1], wide(prompt, cache=quant)[:, -1]
    diffs = [mx.abs(a - b).max().item()]
    for token in (4, 88, 123, 6):
        step = mx.array([[token]])
        a, b = wide(step, cache=exact)[:, -1], wide(step, cache=quant)[:, -1]
        diffs.append(mx.abs(a - b).max().item())
    spread = (mx.max(a) - mx.min(a)).item()
    assert 0 < max(diffs) < tolerance * spread  # changed, but by a fraction of the logit range
    ratio = layout.quantized(bits).bytes_per_token / layout.bytes_per_token
    # float32 heads of 32: bits/32 of the values, plus a float32 scale and bias per 32.
    assert ratio == pytest.approx((32 * bits / 8 + 8) / (32 * 4))
    assert quant.store.nbytes < exact.store.nbytes


def test_quantization_refuses_heads_it_cannot_group(demo) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        demo[0].cache_layout().quantized(8)  # the demo's heads are 16 wide
