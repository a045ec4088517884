"""The store of finished responses (responses_api/store.py): bounds, expiry, tenants."""

from __future__ import annotations

from moeserve.server.http.responses_api.objects import ResponseObject
from moeserve.server.http.responses_api.protocol import InputItem
from moeserve.server.http.responses_api.store import ResponseStore


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def response(rid: str) -> ResponseObject:
    return ResponseObject(id=rid, created_at=0, status="completed", model="m")


def put(store: ResponseStore, rid: str, tenant: str = "", key: str | None = None) -> None:
    items = [InputItem(type="message", role="user", content=rid)]
    store.put(response(rid), items, tenant, key)


def test_get_returns_what_was_put() -> None:
    store = ResponseStore(4, 60.0)
    put(store, "resp_a", key="resp_a")
    entry = store.get("resp_a", "")
    assert entry is not None and entry.response.id == "resp_a"
    assert entry.session_key == "resp_a" and entry.items[0].content == "resp_a"
    assert store.get("resp_b", "") is None


def test_the_oldest_leave_beyond_max_entries() -> None:
    store = ResponseStore(2, 60.0)
    for rid in ("resp_1", "resp_2", "resp_3"):
        put(store, rid)
    assert len(store) == 2
    assert store.get("resp_1", "") is None
    assert store.get("resp_2", "") is not None and store.get("resp_3", "") is not None


def test_zero_entries_stores_nothing() -> None:
    store = ResponseStore(0, 60.0)
    put(store, "resp_1")
    assert len(store) == 0 and store.get("resp_1", "") is None


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    store = ResponseStore(10, 30.0, clock=clock)
    put(store, "resp_old")
    clock.now += 20
    put(store, "resp_new")
    clock.now += 9.9  # resp_old is 29.9 s old
    assert store.get("resp_old", "") is not None
    clock.now += 0.2
    assert store.get("resp_old", "") is None
    assert store.get("resp_new", "") is not None
    assert len(store) == 1
    clock.now += 20
    assert store.get("resp_new", "") is None and len(store) == 0


def test_a_response_is_only_its_tenants() -> None:
    store = ResponseStore(4, 60.0)
    put(store, "resp_a", tenant="alice")
    assert store.get("resp_a", "bob") is None
    assert store.get("resp_a", "") is None  # no keys is not a master key
    assert not store.delete("resp_a", "bob")
    assert store.get("resp_a", "alice") is not None
    assert store.delete("resp_a", "alice")
    assert store.get("resp_a", "alice") is None
    assert not store.delete("resp_a", "alice")


def test_putting_again_renews_the_entry() -> None:
    clock = Clock()
    store = ResponseStore(2, 30.0, clock=clock)
    put(store, "resp_1")
    put(store, "resp_2")
    clock.now += 10
    put(store, "resp_1")  # newest now: resp_2 is the oldest
    put(store, "resp_3")
    assert store.get("resp_2", "") is None
    clock.now += 25  # resp_1's first expiry has passed, its second has not
    assert store.get("resp_1", "") is not None
