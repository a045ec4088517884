"""The prompt-cache manager with fake entries: isolation, trimming, budget, TTL, pins, disk."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest

from moeserve.models.cache import CacheLayout, CacheStore, Full, SequenceCache, Snapshot
from moeserve.server.engine import kv_io
from moeserve.server.engine.prompt_cache import PromptCache, PromptCacheConfig, common_prefix
from moeserve.server.engine.prompt_cache_disk import Writer, temp_path
from moeserve.server.engine.session_keys import belongs_to, check_key, prompt_entry_key, scope_of


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cache(
    max_bytes: int = 1000,
    ttl: float = 100.0,
    directory: Path | None = None,
    fingerprint: str = "model-a",
) -> tuple[PromptCache, Clock]:
    clock = Clock()
    config = PromptCacheConfig(
        max_bytes=max_bytes, ttl_seconds=ttl, directory=directory, fingerprint=fingerprint
    )
    return PromptCache(config, clock=clock, encode=kv_io.tensors, load=kv_io.load), clock


def _kv(tokens: list[int], layers: int = 2) -> tuple[Snapshot, int]:
    kv = [
        (mx.full((1, 2, len(tokens), 4), float(i)), mx.full((1, 2, len(tokens), 4), -float(i)))
        for i in range(layers)
    ]
    snap = Snapshot(len(tokens), kv, [0] * layers)
    return snap, snap.nbytes


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def _keys(cache: PromptCache) -> set[str]:
    return {e.key for e in cache.entries.values() if not e.anonymous}


def test_session_reuses_its_own_entry_or_the_anonymous_pool() -> None:
    cache, _ = _cache(max_bytes=10**6)
    cache.store("", "bob", [1, 2, 9], *_kv([1, 2, 9]))
    cache.store("", None, [1, 2, 3, 4, 5], *_kv([1, 2, 3, 4, 5]))
    hit = cache.lookup("", "bob", [1, 2, 3, 4, 5, 6, 7])
    assert hit.entry.anonymous and hit.length == 5  # the shared pool's longer prefix
    cache.release(hit)
    hit = cache.lookup("", "bob", [1, 2, 9, 9])
    assert hit.entry.key == "bob" and hit.length == 3
    cache.release(hit)
    tie = cache.lookup("", "bob", [1, 2, 8])  # both give 2: the session's own entry wins
    assert tie.entry.key == "bob" and tie.length == 2


def test_no_session_reads_another_sessions_entry() -> None:
    # Before isolation, a miss fell back to every session's entries: a different key (or no
    # key) could read, and through cached_tokens guess, another session's prompt.
    cache, _ = _cache(max_bytes=10**6)
    secret = [1, 2, 3, 4, 5, 6]
    cache.store("", "alice", secret, *_kv(secret))
    assert cache.lookup("", None, [1, 2, 3, 4, 5, 8]) is None
    assert cache.lookup("", "mallory", [1, 2, 3, 4, 5, 8]) is None
    cache.store("", "mallory", [7, 7], *_kv([7, 7]))
    assert cache.lookup("", "mallory", [1, 2, 3, 9]) is None
    assert cache.lookup("", "alice", [1, 2, 3, 9]).length == 3


def test_scopes_separate_tenants_and_salts() -> None:
    cache, _ = _cache(max_bytes=10**6)
    tokens = [1, 2, 3, 4]
    salted = scope_of("t1", "pepper")
    assert salted.startswith("t1:") and "pepper" not in salted
    for scope in ("t1", salted):
        cache.store(scope, "chat", tokens, *_kv(tokens))
        cache.store(scope, None, tokens, *_kv(tokens))
    assert cache.lookup("t2", "chat", tokens) is None  # same key, other tenant
    assert cache.lookup("t2", None, tokens) is None  # their anonymous pools are theirs too
    assert cache.lookup(scope_of("t1", "salt"), "chat", tokens) is None
    assert cache.lookup(salted, "chat", tokens).entry.scope == salted
    assert cache.lookup("t1", None, tokens).entry.scope == "t1"


def test_check_key() -> None:
    assert check_key("chat-1 é 日本") == "chat-1 é 日本"
    for bad, why in (("\ud800", "UTF-8"), ("a\nb", "control"), ("x" * 257, "256")):
        with pytest.raises(ValueError, match=why):
            check_key(bad)
    check_key("x" * 256)


def test_any_string_key_persists(tmp_path: Path) -> None:
    # A lone surrogate reached hashlib's str.encode() here and killed the engine thread.
    cache, _ = _cache(max_bytes=10**6, directory=tmp_path)
    cache.store("", "\ud800", [1, 2], *_kv([1, 2]))
    cache.shutdown()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_hit_is_trimmed_at_divergence() -> None:
    cache, _ = _cache(max_bytes=10**6)
    tokens = [4, 5, 6, 7, 8]
    cache.store("", "s", tokens, *_kv(tokens))
    hit = cache.lookup("", "s", [4, 5, 6, 1, 1, 1])
    assert hit.length == 3
    store = CacheStore(CacheLayout([Full(2, 4)] * 2, 4), mx.float32)
    store.adopt("next/0", hit.entry.kv, hit.length)
    restored = store.snapshot("next/0")
    assert restored.length == 3 and restored.layers[1][0].shape[2] == 3
    assert mx.all(restored.layers[1][0] == 1).item()
    # The restored row grows independently: the entry is never written through.
    views = SequenceCache(store, "next")
    views.seq_ids = ["next/0"]
    views.begin(1, 2)[0].update_and_fetch(mx.ones((1, 2, 2, 4)), mx.ones((1, 2, 2, 4)))
    assert store.rows["next/0"].length == 5
    assert hit.entry.kv.layers[0][0].shape[2] == 5 and mx.all(hit.entry.kv.layers[0][0] == 0).item()


def test_byte_budget_evicts_least_recently_used() -> None:
    kv, size = _kv([1, 2])
    cache, clock = _cache(max_bytes=2 * size)
    cache.store("", "a", [1, 2], kv, size)
    clock.now = 1
    cache.store("", "b", [3, 4], *_kv([3, 4]))
    clock.now = 2
    assert cache.lookup("", "a", [1, 2, 5]) is not None  # touch a: b is now the oldest
    cache.release(cache.lookup("", "a", [1, 2, 5]))
    clock.now = 3
    cache.store("", "c", [5, 6], *_kv([5, 6]))
    assert _keys(cache) == {"a", "c"}
    assert cache.nbytes <= 2 * size


def test_pinned_entries_survive_eviction_until_released() -> None:
    kv, size = _kv([1, 2])
    cache, clock = _cache(max_bytes=2 * size)
    cache.store("", "a", [1, 2], kv, size)
    hit = cache.lookup("", "a", [1, 2, 3])  # a running request reads a
    clock.now = 1
    cache.store("", "b", [3, 4], *_kv([3, 4]))
    clock.now = 2
    cache.store("", "c", [5, 6], *_kv([5, 6]))
    assert _keys(cache) == {"a", "c"}  # a is the oldest but pinned: b went instead
    cache.release(hit)
    clock.now = 3
    cache.store("", "d", [7, 8], *_kv([7, 8]))
    assert _keys(cache) == {"c", "d"}  # unpinned, a is evictable again
    assert cache.nbytes <= 2 * size


def test_next_turn_replacing_a_pinned_entry_is_evictable() -> None:
    # The usual turn: a request pins its session's entry, then stores its own over it.
    # The new entry used to inherit the pin, which the release never took back.
    kv, size = _kv([1, 2])
    cache, clock = _cache(max_bytes=2 * size)
    cache.store("", "a", [1, 2], kv, size)
    hit = cache.lookup("", "a", [1, 2, 3])
    cache.store("", "a", [1, 2], *_kv([1, 2]))
    cache.release(hit)
    for t, key in enumerate(("b", "c"), start=1):
        clock.now = t
        cache.store("", key, [t, t], *_kv([t, t]))
    assert _keys(cache) == {"b", "c"}


def test_ttl_drops_idle_entries() -> None:
    cache, clock = _cache(max_bytes=10**6, ttl=10)
    cache.store("", "a", [1, 2], *_kv([1, 2]))
    clock.now = 5
    cache.store("", "b", [3, 4], *_kv([3, 4]))
    clock.now = 12
    assert cache.lookup("", "a", [1, 2]) is None
    assert cache.lookup("", "b", [3, 4, 5]).entry.key == "b"


def test_sessions_listing_drop_and_clear() -> None:
    cache, _ = _cache(max_bytes=10**6)
    cache.store("", "a", [1, 2], *_kv([1, 2]))
    cache.store("", None, [3], *_kv([3]))  # anonymous: reusable, not listed
    listing = cache.sessions()
    assert [s["key"] for s in listing] == ["a"] and listing[0]["tokens"] == 2
    assert cache.anonymous() == {"entries": 1, "tokens": 1, "bytes": _kv([3])[1]}
    assert cache.drop("a") and not cache.drop("a")
    cache.store("", "b", [1], *_kv([1]))
    assert cache.clear() == 2 and cache.entries == {}


def test_a_session_is_dropped_with_its_further_prompts_entries(tmp_path: Path) -> None:
    cache, _ = _cache(max_bytes=10**6, directory=tmp_path)
    for key in ("a", prompt_entry_key("a", 1), prompt_entry_key("a", 12), "a#x", "ab", "b"):
        cache.store("", key, [1, 2], *_kv([1, 2]))
    assert cache.drop("a") == 3
    assert _keys(cache) == {"a#x", "ab", "b"}, "only a and a#<number> are its entries"
    assert belongs_to("a#3", "a") and not belongs_to("a#³", "a") and not belongs_to("a#", "a")


def test_tenants_see_and_delete_only_their_own(tmp_path: Path) -> None:
    cache, _ = _cache(max_bytes=10**6, directory=tmp_path)
    for scope in ("t1", scope_of("t1", "salt"), "t2"):
        cache.store(scope, "same-key", [1, 2], *_kv([1, 2]))
        cache.store(scope, None, [3], *_kv([3]))
    assert {s["scope"] for s in cache.sessions("t2")} == {"t2"}
    assert len(cache.sessions("t1")) == 2 and len(cache.sessions()) == 3
    assert cache.anonymous("t1")["entries"] == 2 and cache.anonymous("t2")["entries"] == 1
    assert cache.anonymous()["entries"] == 3
    assert cache.drop("same-key", "t2") == 1
    assert {s["scope"] for s in cache.sessions()} == {"t1", scope_of("t1", "salt")}
    assert cache.clear("t1") == 4  # both sessions and both anonymous entries
    assert [e.scope for e in cache.entries.values()] == ["t2"]  # t2's anonymous entry
    cache.flush()
    assert list(tmp_path.glob("*.safetensors")) == []


def test_persistence_round_trip_and_lazy_reload(tmp_path: Path) -> None:
    cache, _ = _cache(max_bytes=10**6, directory=tmp_path)
    tokens = [1, 2, 3, 4]
    cache.store("t1", "alice", tokens, *_kv(tokens))
    cache.shutdown()
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    fresh, _ = _cache(max_bytes=10**6, directory=tmp_path)
    assert fresh.lookup("t2", "alice", tokens) is None  # the scope is kept on disk
    assert fresh.lookup("t1", None, tokens) is None  # sessions never join the anonymous pool
    hit = fresh.lookup("t1", "alice", [1, 2, 3, 9])
    assert hit.length == 3 and hit.entry.kv.layers[1][0][0, 0, 0, 0].item() == 1.0


def test_finished_turns_are_written_without_shutdown(tmp_path: Path) -> None:
    cache, _ = _cache(max_bytes=10**6, directory=tmp_path)
    cache.store("t1", "alice", [1, 2, 3], *_kv([1, 2, 3]))
    cache.store("t1", None, [5, 6], *_kv([5, 6]))  # anonymous entries stay in memory
    assert cache.flush(timeout=30)
    [path] = tmp_path.glob("*.safetensors")
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    # A process killed now (no shutdown) has its session on disk, listed after a restart.
    fresh, _ = _cache(max_bytes=10**6, directory=tmp_path)
    [row] = fresh.sessions()
    assert (row["key"], row["scope"], row["tokens"], row["persisted"]) == ("alice", "t1", 3, True)
    assert fresh.sessions("t2") == []
    assert fresh.lookup("t1", "alice", [1, 2, 3, 4]).length == 3
    _, kv, _, meta = kv_io.load(path)
    assert meta["scope"] == "t1" and kv.layers[0][0].shape == (1, 2, 3, 4)


def test_stale_temporary_files_are_removed_at_startup(tmp_path: Path) -> None:
    cache, _ = _cache(max_bytes=10**6, directory=tmp_path)
    cache.store("", "kept", [1, 2], *_kv([1, 2]))
    cache.shutdown()
    torn = [tmp_path / ".0123.safetensors.tmp", tmp_path / ".4567.safetensors"]
    for path in torn:
        path.write_bytes(b"\x08\x00\x00")
    _cache(max_bytes=10**6, directory=tmp_path)
    assert not any(p.exists() for p in torn)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_writer_keeps_only_the_newest_pending_write(tmp_path: Path) -> None:
    writer = Writer(max_pending_bytes=10**6)
    gate = threading.Event()
    blocked = tmp_path / "blocked.safetensors"
    real_write = writer._write

    def slow(job):  # hold the thread on the first file so the others queue up
        if job.path == blocked:
            gate.wait(10)
        real_write(job)

    writer._write = slow
    one = {"x": ("F32", [1], b"\x00\x00\x80\x3f")}
    two = {"x": ("F32", [1], b"\x00\x00\x00\x40")}
    target = tmp_path / "s.safetensors"
    assert writer.submit(blocked, one, {})
    assert writer.submit(target, one, {"n": "1"})
    assert writer.submit(target, two, {"n": "2"})
    assert len(writer._pending) <= 2
    gate.set()
    writer.close(30)
    loaded, meta = mx.load(str(target), return_metadata=True)
    assert meta == {"n": "2"} and loaded["x"].item() == 2.0
    assert writer.written == 2  # the first write of s was skipped
    assert not temp_path(target).exists()
    assert not writer.submit(target, one, {})  # closed


def test_evicted_entries_stay_on_disk(tmp_path: Path) -> None:
    kv, size = _kv([1, 2])
    cache, clock = _cache(max_bytes=size, directory=tmp_path)
    real_write = cache._writer._write

    def slow(job):  # a disk that lags: a's file lands after a is evicted and looked up
        time.sleep(0.3)
        real_write(job)

    cache._writer._write = slow
    cache.store("", "a", [1, 2], kv, size)
    clock.now = 1
    cache.store("", "b", [3, 4], *_kv([3, 4]))
    assert "a" not in _keys(cache)
    assert cache.lookup("", "a", [1, 2, 7]).length == 2  # found again on disk


def test_foreign_truncated_and_corrupt_files_are_ignored(tmp_path: Path, caplog) -> None:
    other, _ = _cache(max_bytes=10**6, directory=tmp_path, fingerprint="model-b")
    other.store("", "foreign", [1, 2, 3], *_kv([1, 2, 3]))
    other.shutdown()
    good, _ = _cache(max_bytes=10**6, directory=tmp_path)
    good.store("", "ok", [1, 2, 3], *_kv([1, 2, 3]))
    good.shutdown()
    ok_file = good._file("", "ok")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{{{{")
    data = ok_file.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    fresh, _ = _cache(max_bytes=10**6, directory=tmp_path)
    assert fresh.lookup("", "foreign", [1, 2, 3, 4]) is None  # another model's file
    assert fresh.lookup("", "ok", [1, 2, 3, 4]).length == 3
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "another model" in messages and "unreadable" in messages


def test_file_that_breaks_after_indexing_is_a_miss(tmp_path: Path) -> None:
    cache, _ = _cache(max_bytes=10**6, directory=tmp_path)
    cache.store("", "a", [1, 2], *_kv([1, 2]))
    cache.shutdown()
    fresh, _ = _cache(max_bytes=10**6, directory=tmp_path)
    assert [s["key"] for s in fresh.sessions()] == ["a"]  # listed from disk, not loaded
    assert fresh.entries == {}
    path = fresh._file("", "a")
    path.write_bytes(path.read_bytes()[:40])
    assert fresh.lookup("", "a", [1, 2, 3]) is None
    assert fresh.sessions() == []
