"""The engine end to end on a real tiny Qwen2-MoE: isolation, seeds, cancellation, stops."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from moeserve.devtools.demo import CheckpointSpec, build_checkpoint
from moeserve.models import load
from moeserve.server.engine.engine import Engine, EngineDeadError
from moeserve.server.engine.events import DeltaEvent, ErrorEvent, FinishEvent, GenerationRequest
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import QueueFullError, SchedulerConfig
from moeserve.server.text.tokenizer import Tokenizer

CHUNK = 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[object, Tokenizer, Path]:
    path = build_checkpoint(tmp_path_factory.mktemp("demo"), CheckpointSpec(seed=3))
    return load(path).model, Tokenizer.from_dir(path), path


def _engine(demo, **limits) -> Engine:
    model, tokenizer, _ = demo
    config = SchedulerConfig(
        max_running=limits.pop("max_running", 16),
        max_batched_tokens=limits.pop("max_batched_tokens", 64),
        prefill_chunk=limits.pop("prefill_chunk", CHUNK),
        max_model_len=512,
        **limits,
    )
    engine = Engine(model, tokenizer, config)
    engine.start()
    return engine


async def _collect(engine: Engine, request: GenerationRequest, after_step: int = 0):
    # Joining after a given engine step makes "arrives while others run" deterministic.
    start = engine.steps
    while engine.steps < start + after_step:
        await asyncio.sleep(0.001)
    text, ids, finish = [""] * request.n, [[] for _ in range(request.n)], [None] * request.n
    async for event in engine.generate(request):
        if isinstance(event, DeltaEvent):
            text[event.index] += event.text
            ids[event.index] += event.token_ids
        elif isinstance(event, FinishEvent):
            finish[event.index] = event
        elif isinstance(event, ErrorEvent):
            raise AssertionError(event.message)
    return text, ids, finish


def _request(prompt: list[int], **params) -> GenerationRequest:
    n = params.pop("n", 1)
    return GenerationRequest(uuid.uuid4().hex, prompt, SamplingParams(**params), n=n)


def _prompts(tokenizer: Tokenizer) -> list[list[int]]:
    words = [
        "the",
        "model",
        "reads",
        "a",
        "token",
        "and",
        "the",
        "scheduler",
        "decides",
        "who",
        "runs",
        "next",
    ]
    prompts = [tokenizer.encode(" ".join(words[: 2 + i])) for i in range(7)]
    prompts.append(tokenizer.encode(" ".join(words * 5)))  # several prefill chunks long
    assert len(prompts[-1]) > 2 * CHUNK
    return prompts


def test_batched_greedy_outputs_equal_solo_runs(demo) -> None:
    prompts = _prompts(demo[1])
    params = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}
    engine = _engine(demo)
    try:
        solo = [asyncio.run(_collect(engine, _request(p, **params)))[1][0] for p in prompts]

        async def together():
            # Request i joins at step 2i, while the earlier ones are still decoding.
            tasks = [_collect(engine, _request(p, **params), 2 * i) for i, p in enumerate(prompts)]
            return await asyncio.gather(*tasks)

        batched = [r[1][0] for r in asyncio.run(together())]
    finally:
        engine.shutdown()
    assert all(len(s) == 24 for s in solo)
    assert engine.runner.max_batch_seen >= 6, "the requests did not actually overlap"
    assert batched == solo


def test_seeded_sampling_is_independent_of_batch(demo) -> None:
    prompts = _prompts(demo[1])
    seeded = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 10, "ignore_eos": True, "seed": 7}
    engine = _engine(demo)
    try:
        alone = asyncio.run(_collect(engine, _request(prompts[2], **seeded)))[1][0]

        async def crowd():
            others = [
                _collect(engine, _request(p, temperature=1.0, max_tokens=10)) for p in prompts
            ]
            mine = _collect(engine, _request(prompts[2], **seeded), 3)
            return await asyncio.gather(mine, *others)

        crowded = asyncio.run(crowd())[0][1][0]
    finally:
        engine.shutdown()
    assert crowded == alone


def test_cancelled_request_frees_its_slot(demo) -> None:
    prompts = _prompts(demo[1])
    params = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
    engine = _engine(demo, max_running=2)
    try:
        expected = asyncio.run(_collect(engine, _request(prompts[1], **params)))[1][0]

        async def scenario():
            victim = _request(prompts[0], temperature=0.0, max_tokens=400, ignore_eos=True)
            stream = engine.generate(victim)
            await stream.__anext__()  # it is decoding now, holding one of two slots
            others = [_collect(engine, _request(prompts[1], **params)) for _ in range(3)]
            task = asyncio.gather(*others)
            await asyncio.sleep(0.05)
            await stream.aclose()  # client went away: the engine aborts the request
            return await asyncio.wait_for(task, timeout=60)

        results = asyncio.run(scenario())
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)  # finished sequences leave at the engine's next step
        assert (engine.stats()["running"], engine.stats()["waiting"]) == (0, 0)
    finally:
        engine.shutdown()
    assert [r[1][0] for r in results] == [expected] * 3
    assert engine.runner.num_decoding == 0


def test_n_choices_and_usage(demo) -> None:
    prompt = _prompts(demo[1])[3]
    engine = _engine(demo)
    try:
        _, ids, finish = asyncio.run(
            _collect(engine, _request(prompt, n=3, temperature=0.0, max_tokens=5, ignore_eos=True))
        )
    finally:
        engine.shutdown()
    assert ids[0] == ids[1] == ids[2]
    assert [f.finish_reason for f in finish] == ["length"] * 3
    assert all(f.prompt_tokens == len(prompt) and f.completion_tokens == 5 for f in finish)


def test_stop_string_spanning_tokens_is_cut(demo) -> None:
    prompt = _prompts(demo[1])[4]
    engine = _engine(demo)
    try:
        free_text, free_ids, _ = asyncio.run(
            _collect(engine, _request(prompt, temperature=0.0, max_tokens=20, ignore_eos=True))
        )
        # A stop string made of the tail of token 3 and the head of token 4 spans a boundary.
        tokenizer = demo[1]
        before = tokenizer.decode(free_ids[0][:3])
        upto4 = tokenizer.decode(free_ids[0][:4])
        pieces = [tokenizer.decode(free_ids[0][:k]) for k in range(1, 6)]
        assert len(set(pieces)) == 5, "need tokens that each add text"
        stop = upto4[len(before) - 1 : len(before) + 1]
        assert len(stop) == 2
        text, _, finish = asyncio.run(
            _collect(engine, _request(prompt, temperature=0.0, max_tokens=20, stop=[stop]))
        )
    finally:
        engine.shutdown()
    cut = free_text[0].index(stop)
    assert text[0] == free_text[0][:cut]
    assert stop not in text[0]
    assert finish[0].finish_reason == "stop"


def test_eos_from_generation_config_stops(demo) -> None:
    model, tokenizer, path = demo
    prompt = _prompts(tokenizer)[5]
    engine = _engine(demo)
    try:
        _, ids, _ = asyncio.run(
            _collect(engine, _request(prompt, temperature=0.0, max_tokens=6, ignore_eos=True))
        )
    finally:
        engine.shutdown()
    # Declare the third generated token an EOS id, only in generation_config.json.
    eos = ids[0][2]
    gen = json.loads((path / "generation_config.json").read_text())
    patched = Tokenizer.from_dir(path)
    assert eos not in patched.eos_token_ids
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eos]}))
    try:
        patched = Tokenizer.from_dir(path)
    finally:
        (path / "generation_config.json").write_text(json.dumps(gen))
    assert eos in patched.eos_token_ids
    engine = Engine(model, patched, SchedulerConfig(max_model_len=512))
    engine.start()
    try:
        _, stopped, finish = asyncio.run(
            _collect(engine, _request(prompt, temperature=0.0, max_tokens=6))
        )
        _, kept, _ = asyncio.run(
            _collect(engine, _request(prompt, temperature=0.0, max_tokens=6, min_tokens=4))
        )
    finally:
        engine.shutdown()
    assert stopped[0] == ids[0][:2] and finish[0].finish_reason == "stop"
    assert finish[0].completion_tokens == 3  # the EOS counts as generated, not as text
    assert len(kept[0]) >= 4 and eos not in kept[0][:4]


def test_queue_limit_refuses_with_queue_full(demo) -> None:
    prompts = _prompts(demo[1])
    engine = _engine(demo, max_running=1, max_waiting=1)
    try:

        async def flood():
            long = _request(prompts[0], temperature=0.0, max_tokens=200, ignore_eos=True)
            first = engine.generate(long)
            await first.__anext__()
            queued = asyncio.ensure_future(_collect(engine, _request(prompts[1], max_tokens=2)))
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFullError):
                await _collect(engine, _request(prompts[2], max_tokens=2))
            await first.aclose()
            await queued

        asyncio.run(flood())
    finally:
        engine.shutdown()
    assert not engine.healthy


class _Exploding:
    """A model that works for a few calls and then raises, as a broken kernel would."""

    def __init__(self, model, calls: int) -> None:
        self.model, self.calls = model, calls

    def __call__(self, tokens, cache=None, last_only=False):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("kernel exploded")
        return self.model(tokens, cache=cache, last_only=last_only)

    def __getattr__(self, name):
        return getattr(self.model, name)  # make_cache, cache_layout, cache_dtype, ...


def test_engine_death_fails_requests_and_reports_unhealthy(demo) -> None:
    model, tokenizer, _ = demo
    engine = Engine(_Exploding(model, calls=3), tokenizer, SchedulerConfig(max_model_len=512))
    engine.start()
    prompt = _prompts(tokenizer)[2]

    async def scenario():
        events = []
        async for event in engine.generate(_request(prompt, max_tokens=50, ignore_eos=True)):
            events.append(event)
        return events

    events = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert isinstance(events[-1], ErrorEvent) and "kernel exploded" in events[-1].message
    assert not engine.healthy
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(engine, _request(prompt, max_tokens=2)))


def test_prompt_cache_reuse_is_exact_and_reported(demo) -> None:
    from moeserve.server.engine.prompt_cache import PromptCache, PromptCacheConfig

    model, tokenizer, _ = demo
    cold = _engine(demo)
    config = SchedulerConfig(max_model_len=512, prefill_chunk=CHUNK, max_batched_tokens=64)
    warm = Engine(model, tokenizer, config, prompt_cache=PromptCache(PromptCacheConfig()))
    warm.start()
    params = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
    prompt = _prompts(tokenizer)[-1]  # several chunks long
    try:
        history, previous_len = list(prompt), 0
        for turn in range(3):
            request = _request(history, **params)
            request.session_key = "chat-1"
            _, warm_ids, warm_finish = asyncio.run(_collect(warm, request))
            _, cold_ids, cold_finish = asyncio.run(_collect(cold, _request(history, **params)))
            assert warm_ids == cold_ids, f"turn {turn}: reuse changed the output"
            assert cold_finish[0].cached_tokens == 0
            # Everything the previous turn computed is reused: its prompt and all but the
            # last generated token (whose KV a LENGTH finish never computes).
            expected = max(previous_len - 1, 0)
            assert warm_finish[0].cached_tokens == expected
            previous_len = len(history) + len(warm_ids[0])
            history = history + warm_ids[0] + tokenizer.encode(f" and then turn {turn}")
        # Another session sharing that prefix never reads chat-1's entries...
        other = _request(prompt + tokenizer.encode(" something else"), **params)
        other.session_key = "chat-2"
        _, ids, finish = asyncio.run(_collect(warm, other))
        _, cold_ids, _ = asyncio.run(_collect(cold, _request(other.prompt_ids, **params)))
        assert ids == cold_ids and finish[0].cached_tokens == 0
        # ...but reuses what a keyless request left in the shared pool, output unchanged.
        asyncio.run(_collect(warm, _request(prompt, **params)))
        third = _request(prompt + tokenizer.encode(" a third thing"), **params)
        third.session_key = "chat-3"
        _, ids, finish = asyncio.run(_collect(warm, third))
        _, cold_ids, _ = asyncio.run(_collect(cold, _request(third.prompt_ids, **params)))
        assert ids == cold_ids and finish[0].cached_tokens >= len(prompt) - 1
        # And another tenant's request sees none of it.
        foreign = _request(third.prompt_ids, **params)
        foreign.session_key, foreign.cache_scope = "chat-3", "another-tenant"
        assert asyncio.run(_collect(warm, foreign))[2][0].cached_tokens == 0
    finally:
        cold.shutdown()
        warm.shutdown()


class _TextBreaks:
    """A tokenizer whose streaming detokenizer raises for requests keeping token id -1."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def detokenizer(self, keep=frozenset()):
        detok = self._tokenizer.detokenizer(keep - {-1})
        if -1 in keep:
            detok.add = lambda token: 1 / 0  # as a tokenizer bug on odd input would
        return detok


def test_a_failure_in_one_requests_output_fails_only_that_request(demo) -> None:
    model, tokenizer, _ = demo
    engine = Engine(model, _TextBreaks(tokenizer), SchedulerConfig(max_model_len=512))
    engine.start()
    prompt = _prompts(tokenizer)[3]
    params = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}

    async def both():
        bad = _request(prompt, **params)
        bad.keep_special_ids = frozenset({-1})
        good = _request(prompt, **params)
        return await asyncio.gather(
            _collect(engine, bad), _collect(engine, good), return_exceptions=True
        )

    try:
        failed, (_, ids, finish) = asyncio.run(both())
        assert engine.healthy  # the engine thread survived it
    finally:
        engine.shutdown()
    assert isinstance(failed, AssertionError) and "division by zero" in str(failed)
    assert len(ids[0]) == 12 and finish[0].finish_reason == "length"


def test_callers_that_leave_before_their_turn_are_skipped(demo) -> None:
    import concurrent.futures

    from moeserve.server.engine.engine import Admit, Call
    from moeserve.server.engine.output import RequestOutput

    model, tokenizer, _ = demo
    engine = Engine(model, tokenizer, SchedulerConfig(max_model_len=512))
    engine.start()
    prompt = _prompts(tokenizer)[1]
    try:

        async def leave_early():
            # What a disconnect does to a request (or an admin call) still in the inbox:
            # its future is cancelled, and a cancelled future refuses a result.
            loop = asyncio.get_running_loop()
            client = RequestOutput(_request(prompt, max_tokens=2), loop, asyncio.Queue(), 1)
            for message in (
                Admit(client, concurrent.futures.Future()),
                Call(dict, concurrent.futures.Future()),
            ):
                (message.admitted if isinstance(message, Admit) else message.done).cancel()
                engine._inbox.put(message)
            return await _collect(engine, _request(prompt, max_tokens=2, ignore_eos=True))

        _, ids, _ = asyncio.run(leave_early())
        assert engine.healthy and len(ids[0]) == 2
    finally:
        engine.shutdown()


class _BrokenCache:
    """A prompt cache whose every operation raises, as a disk or encoding failure would."""

    def __init__(self, fail_lookup: bool = False) -> None:
        self.fail_lookup = fail_lookup
        self.nbytes = 0

    def lookup(self, scope, session, tokens):
        if self.fail_lookup:
            raise OSError("disk gone")
        from moeserve.server.engine.prompt_cache import Entry, Hit

        entry = Entry(session or "", list(tokens), [("not", "arrays")], 0, 0.0)
        return Hit(entry, len(tokens))  # restoring this KV fails

    def store(self, *args):
        raise OSError("disk gone")

    def release(self, hit):
        raise OSError("disk gone")

    def shutdown(self):
        raise OSError("disk gone")


def test_prompt_cache_failures_never_stop_the_engine(demo, tmp_path) -> None:
    from moeserve.server.engine import kv_io
    from moeserve.server.engine.prompt_cache import PromptCache, PromptCacheConfig

    model, tokenizer, _ = demo
    prompt = _prompts(tokenizer)[2]
    params = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}
    config = SchedulerConfig(max_model_len=512)
    # A lookup that fails is a miss; a store that fails loses only the entry.
    engine = Engine(model, tokenizer, config, prompt_cache=_BrokenCache(fail_lookup=True))
    engine.start()
    try:
        for _ in range(2):
            assert (
                asyncio.run(_collect(engine, _request(prompt, **params)))[2][0].cached_tokens == 0
            )
        assert engine.healthy
    finally:
        engine.shutdown()
    assert engine.error is None
    # A hit that cannot be restored refuses its request at admission, and only it.
    engine = Engine(model, tokenizer, config, prompt_cache=_BrokenCache())
    engine.start()
    try:
        with pytest.raises(AttributeError):  # the "snapshot" is a list
            asyncio.run(_collect(engine, _request(prompt, **params)))
        assert engine.healthy and engine.stats()["running"] == 0
    finally:
        engine.shutdown()
    # A key no file name could take (a lone surrogate) is stored and persisted.
    directory = tmp_path / "sessions"
    cache = PromptCache(
        PromptCacheConfig(directory=directory), encode=kv_io.tensors, load=kv_io.load
    )
    engine = Engine(model, tokenizer, config, prompt_cache=cache)
    engine.start()
    try:
        for _ in range(2):
            request = _request(prompt, **params)
            request.session_key = "\ud800"
            asyncio.run(_collect(engine, request))
        assert engine.healthy
    finally:
        engine.shutdown()
    assert len(list(directory.glob("*.safetensors"))) == 1


def test_engines_in_one_process_draw_their_own_noise(demo) -> None:
    # Since MLX 0.32 each thread's generator starts from one per-process key, so two engine
    # threads would sample the same unseeded tokens (and fail or pass tests together).
    prompt = _prompts(demo[1])[0]
    samples = []
    for _ in range(2):
        engine = _engine(demo)
        try:
            request = _request(prompt, temperature=1.0, max_tokens=16, ignore_eos=True)
            samples.append(asyncio.run(_collect(engine, request))[1][0])
        finally:
            engine.shutdown()
    # The demo model's next-token distributions are nearly flat over 512 tokens: two
    # independent 16-token draws agree with probability far below one in a million.
    assert len(samples[0]) == len(samples[1]) == 16 and samples[0] != samples[1]
