"""The online store contract, run against both backends (SQLite file, throw-away Redis)."""

from __future__ import annotations

import pickle
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from adrec_assets.online.store import (
    ConcurrentUpdateError,
    InvalidArraysError,
    InvalidEventError,
    InvalidKeyError,
    InvalidMetaError,
    InvalidVectorError,
    MemoryState,
    MemoryStore,
    OnlineStore,
    RedisStore,
    SQLiteStore,
    StoreClosedError,
    StoreFormatError,
    StoreInputError,
    StoreUnavailableError,
    open_store,
)
from adrec_assets_tests.redis_server import redis_server

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE = "users:aaaa1111"
OTHER_SPACE = "users:bbbb2222"
ALICE = "0123456789abcdef0123456789abcdef"
BOB = "fedcba9876543210fedcba9876543210"
D_USER, D_CONTENT = 128, 768


class FakeClock:
    """Deterministic time: every reading advances one second."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")
    with redis_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "redis", "memory"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., OnlineStore]]:
    """Factory of stores over ONE backing state per test: a second call is a reopen / another
    replica / another source (namespace)."""
    opened: list[OnlineStore] = []
    if request.param == "memory":
        state = MemoryState()

        def make(namespace: str = "src", **kw: object) -> OnlineStore:
            opened.append(MemoryStore(namespace, state=state, **kw))
            return opened[-1]
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        import redis

        with redis.Redis.from_url(url) as admin:
            admin.flushdb()

        def make(namespace: str = "src", **kw: object) -> OnlineStore:
            opened.append(RedisStore(url, namespace=namespace, **kw))
            return opened[-1]
    else:
        path = tmp_path / "online" / "store.sqlite3"

        def make(namespace: str = "src", **kw: object) -> OnlineStore:
            opened.append(SQLiteStore(path, namespace=namespace, **kw))
            return opened[-1]

    yield make
    for store in opened:
        store.close()


def rand_vec(rng: np.random.Generator, d: int = D_USER) -> np.ndarray:
    return rng.standard_normal(d).astype(np.float32)


def snapshot(store: OnlineStore) -> tuple:
    """Everything observable, to prove that a rejected call changed nothing."""
    state = store.get_user_state(SPACE, ALICE)
    return (
        None if state is None else (state.vector.tobytes(), state.n_updates, state.updated_at),
        sorted(store.retired_ads()),
        [(a.ad_id, a.content_vector.tobytes(), a.meta) for a in store.live_ads()],
        store.pending_events(100),
        {k: v.tobytes() for k, v in (store.get_arrays("posterior") or {}).items()},
    )


# ---------------------------------------------------------------------- user vectors
def test_user_vector_round_trips_with_update_count_and_time(make_store):
    store = make_store(clock=FakeClock(100.0))
    rng = np.random.default_rng(0)
    first, second = rand_vec(rng), rand_vec(rng)
    assert store.get_user(SPACE, ALICE) is None
    seen: list[np.ndarray | None] = []

    def set_to(v: np.ndarray) -> Callable[[np.ndarray | None], np.ndarray]:
        return lambda cur: (seen.append(cur), v)[1]

    np.testing.assert_array_equal(store.update_user(SPACE, ALICE, set_to(first)), first)
    store.update_user(SPACE, ALICE, set_to(second))
    assert seen[0] is None
    np.testing.assert_array_equal(seen[1], first)
    got = store.get_user(SPACE, ALICE)
    assert got.dtype == np.float32 and got.shape == (D_USER,)
    np.testing.assert_array_equal(got, second)
    state = store.get_user_state(SPACE, ALICE)
    assert state.n_updates == 2 and state.updated_at == 102.0
    users = store.get_users(SPACE, [BOB, ALICE, BOB])
    assert users[0] is None and users[2] is None
    np.testing.assert_array_equal(users[1], second)


def test_update_user_may_modify_the_vector_it_is_handed(make_store):
    store = make_store()
    store.update_user(SPACE, ALICE, lambda cur: np.ones(D_USER, np.float32))

    def ema(cur: np.ndarray | None) -> np.ndarray:
        cur *= 0.5  # in place: must be the caller's own copy
        cur += 0.5 * np.full(D_USER, 3.0, np.float32)
        return cur

    np.testing.assert_allclose(store.update_user(SPACE, ALICE, ema), np.full(D_USER, 2.0))
    np.testing.assert_allclose(store.get_user(SPACE, ALICE), np.full(D_USER, 2.0))


def test_vector_from_another_user_space_is_not_returned(make_store):
    store = make_store()
    store.update_user(OTHER_SPACE, ALICE, lambda cur: np.ones(D_USER, np.float32))
    assert store.get_user(SPACE, ALICE) is None
    assert store.get_users(SPACE, [ALICE]) == [None]
    handed: list[np.ndarray | None] = []
    store.update_user(SPACE, ALICE, lambda cur: (handed.append(cur), np.zeros(D_USER, np.float32))[1])
    assert handed == [None]  # the old space's vector is not the starting point either
    np.testing.assert_array_equal(store.get_user(OTHER_SPACE, ALICE), np.ones(D_USER))


def test_drop_user_space_deletes_only_that_space(make_store):
    store, other_source = make_store(), make_store("other")
    for who in (ALICE, BOB):
        store.update_user(OTHER_SPACE, who, lambda cur: np.ones(D_USER, np.float32))
    store.update_user(SPACE, ALICE, lambda cur: np.ones(D_USER, np.float32))
    other_source.update_user(OTHER_SPACE, ALICE, lambda cur: np.ones(D_USER, np.float32))
    assert store.drop_user_space(OTHER_SPACE) == 2
    assert store.get_users(OTHER_SPACE, [ALICE, BOB]) == [None, None]
    assert store.get_user(SPACE, ALICE) is not None
    assert other_source.get_user(OTHER_SPACE, ALICE) is not None


def _increment_slowly(cur: np.ndarray | None) -> np.ndarray:
    """+1 on element 0 with a pause between read and write: a non-atomic read-modify-write
    would lose updates here."""
    new = np.zeros(D_USER, np.float32) if cur is None else cur
    time.sleep(0.002)
    new[0] += 1.0
    return new


def test_concurrent_updates_from_threads_and_replicas_lose_none(make_store):
    replicas = [make_store() for _ in range(2)]  # two store objects = two service replicas
    n_threads, per_thread = 6, 15

    def worker(t: int) -> None:
        for _ in range(per_thread):
            replicas[t % 2].update_user(SPACE, ALICE, _increment_slowly)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    state = replicas[0].get_user_state(SPACE, ALICE)
    assert state.vector[0] == n_threads * per_thread
    assert state.n_updates == n_threads * per_thread


def test_failed_or_invalid_update_changes_nothing(make_store):
    store = make_store()
    store.update_user(SPACE, ALICE, lambda cur: np.ones(D_USER, np.float32))
    before = snapshot(store)

    def boom(cur: np.ndarray | None) -> np.ndarray:
        raise RuntimeError("policy failed")

    with pytest.raises(RuntimeError, match="policy failed"):
        store.update_user(SPACE, ALICE, boom)
    bad_results = [
        np.full(D_USER, np.nan, np.float32),
        np.ones(D_USER - 1, np.float32),
        np.ones((1, D_USER)),
        np.array(["x"] * D_USER),
    ]
    for bad in bad_results:
        with pytest.raises(InvalidVectorError, match="update_user"):
            store.update_user(SPACE, ALICE, lambda cur, bad=bad: bad)
    with pytest.raises(InvalidVectorError):  # a new user is not created by a bad update either
        store.update_user(SPACE, BOB, lambda cur: np.full(D_USER, np.inf, np.float32))
    assert snapshot(store) == before
    assert store.get_user(SPACE, BOB) is None


# ---------------------------------------------------------------------- ads
def test_retired_ads_round_trip(make_store):
    store = make_store()
    assert store.retired_ads() == set() and not store.is_retired("ad-1")
    store.retire_ad("ad-1")
    store.retire_ad("ad-1")  # idempotent
    store.retire_ad("ad 2 / ünïcode")
    assert store.retired_ads() == {"ad-1", "ad 2 / ünïcode"}
    assert store.is_retired("ad-1") and not store.is_retired("ad-3")
    assert store.unretire_ad("ad-1") is True
    assert store.unretire_ad("ad-1") is False
    assert store.retired_ads() == {"ad 2 / ünïcode"}


def test_live_ads_round_trip_replace_and_drop(make_store):
    store = make_store(clock=FakeClock(0.0))
    rng = np.random.default_rng(1)
    v1, v2, v3 = (rand_vec(rng, D_CONTENT) for _ in range(3))
    store.put_live_ad("b-ad", v1, {"title": "Shoes", "url": "https://example.com/b"})
    store.put_live_ad("a-ad", v2)
    store.put_live_ad("b-ad", v3, {"title": "Boots"})  # replaces
    ads = store.live_ads()
    assert [a.ad_id for a in ads] == ["a-ad", "b-ad"]
    np.testing.assert_array_equal(ads[0].content_vector, v2)
    assert ads[0].meta == {} and ads[0].content_vector.dtype == np.float32
    np.testing.assert_array_equal(ads[1].content_vector, v3)
    assert ads[1].meta == {"title": "Boots"} and ads[1].added_at == 3.0
    assert store.drop_live_ad("b-ad") is True
    assert store.drop_live_ad("b-ad") is False
    assert [a.ad_id for a in store.live_ads()] == ["a-ad"]


# ---------------------------------------------------------------------- events
def test_events_are_handed_out_again_until_marked_flushed_and_seqs_never_reused(make_store):
    store = make_store()
    rows = [{"kind": "impression", "ad": f"ad-{i}", "user": ALICE, "pos": i, "score": 0.5 * i} for i in range(5)]
    seqs = store.append_events(rows[:3]) + store.append_events(rows[3:])
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    first = store.pending_events(limit=3)
    assert first == list(zip(seqs[:3], rows[:3]))
    assert store.pending_events(limit=3) == first  # read again without marking: same events
    assert store.mark_flushed(seqs[2]) == 3
    assert store.pending_events() == list(zip(seqs[3:], rows[3:]))
    assert store.mark_flushed(seqs[-1]) == 2
    assert store.pending_events() == []
    later = store.append_events([{"kind": "click"}])
    assert later[0] > seqs[-1]  # a fully drained queue does not restart numbering
    assert store.pending_events() == [(later[0], {"kind": "click"})]


def test_events_survive_a_reopen_until_flushed(make_store):
    store = make_store()
    seqs = store.append_events([{"kind": "click", "i": i} for i in range(4)])
    handed_out = store.pending_events(limit=2)
    store.close()  # "crash" after reading, before mark_flushed
    reopened = make_store()
    assert reopened.pending_events(limit=2) == handed_out
    reopened.mark_flushed(seqs[1])
    reopened.close()
    again = make_store()
    assert again.pending_events() == [(seqs[2], {"kind": "click", "i": 2}), (seqs[3], {"kind": "click", "i": 3})]


def test_concurrent_appends_get_distinct_increasing_seqs(make_store):
    replicas = [make_store() for _ in range(2)]
    got: list[list[int]] = [[] for _ in range(4)]

    def worker(t: int) -> None:
        for i in range(10):
            got[t] += replicas[t % 2].append_events([{"t": t, "i": i}, {"t": t, "i": i, "second": True}])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    all_seqs = [s for g in got for s in g]
    assert len(set(all_seqs)) == 80
    assert all(g == sorted(g) for g in got)
    pending = replicas[0].pending_events(limit=1000)
    assert [s for s, _ in pending] == sorted(all_seqs)  # queue order is seq order
    for seqs in got:  # each batch of two is contiguous in the queue
        assert all(b == a + 1 for a, b in zip(seqs[::2], seqs[1::2]))


# ---------------------------------------------------------------------- leases
def test_a_lease_has_one_holder_until_it_is_released_or_expires(make_store):
    clock = [1000.0]
    a, b = make_store(clock=lambda: clock[0]), make_store(clock=lambda: clock[0])  # two replicas
    ttl = 60.0 if not isinstance(a, RedisStore) else 0.3  # Redis expires by its own (real) clock
    assert a.hold_lease("event-flush", "replica-a", ttl) is True
    assert b.hold_lease("event-flush", "replica-b", ttl) is False
    assert a.hold_lease("event-flush", "replica-a", ttl) is True  # the holder renews
    assert b.hold_lease("other-chore", "replica-b", ttl) is True  # leases are independent by name
    assert b.release_lease("event-flush", "replica-b") is False  # not its lease: nothing released
    assert b.hold_lease("event-flush", "replica-b", ttl) is False
    assert a.release_lease("event-flush", "replica-a") is True
    assert b.hold_lease("event-flush", "replica-b", ttl) is True  # free at once after a release
    if isinstance(a, RedisStore):
        time.sleep(ttl + 0.2)
    else:
        clock[0] += ttl + 1
    assert a.hold_lease("event-flush", "replica-a", ttl) is True  # a dead holder's lease expires
    with pytest.raises(StoreInputError):
        a.hold_lease("event-flush", "replica-a", 0)
    with pytest.raises(InvalidKeyError):
        a.hold_lease("event flush", "replica-a", ttl)


def test_a_replica_cannot_flush_while_another_is_mid_flush_so_no_event_is_written_twice(make_store, tmp_path):
    """Replica A reads the queue; before it writes, a new event arrives and replica B
    flushes. Without the flush lease B would write events 1-4 under one name and A 1-3 under
    another: three events twice in the log and in the training clicks."""
    from adrec_assets.online.events import EventFlusher, read_event_log

    folder = tmp_path / "source"
    store_a, store_b = make_store(), make_store()
    replica_a, replica_b = EventFlusher(store_a, folder), EventFlusher(store_b, folder)
    store_a.append_events([_event_row(f"e{i}") for i in range(3)])
    read_queue = store_a.pending_events
    flushed_by_b: list[int] = []

    def read_then_let_b_flush(limit: int) -> list:
        pending = read_queue(limit)
        store_b.append_events([_event_row("e3")])
        flushed_by_b.append(replica_b.flush(100, known_ads=frozenset()))
        return pending

    store_a.pending_events = read_then_let_b_flush  # type: ignore[method-assign]
    assert replica_a.flush(100, known_ads=frozenset()) == 3
    assert flushed_by_b == [0]  # A held the lease
    replica_a.release()
    assert replica_b.flush(100, known_ads=frozenset()) == 1
    ids = read_event_log(folder).column("event_id").to_pylist()
    assert sorted(ids) == ["e0", "e1", "e2", "e3"]


def _event_row(event_id: str) -> dict[str, object]:
    from adrec_assets.online.events import EVENT_SCHEMA

    row: dict[str, object] = {field.name: None for field in EVENT_SCHEMA}
    row.update(event_id=event_id, request_id="r" * 32, type="impression", ad_id="ad-1", position=0,
               timestamp=1.0, served_at=1.0, weight=1.0)  # fmt: skip
    return row


def test_served_requests_are_remembered_until_they_expire(make_store):
    clock = [1000.0]
    store = make_store(clock=lambda: clock[0])
    record = {"user": ALICE, "ads": ["a1", "a2"], "propensities": [1.0, 0.5]}
    store.put_request("req-1", record, ttl_seconds=60)
    assert make_store(clock=lambda: clock[0]).get_request("req-1") == record  # another replica sees it
    assert store.get_request("req-2") is None
    clock[0] += 59
    assert store.get_request("req-1") == record
    clock[0] += 2
    if isinstance(store, (SQLiteStore, MemoryStore)):  # Redis expires by its own (real) clock
        assert store.get_request("req-1") is None
    with pytest.raises(StoreInputError):
        store.put_request("req-3", record, ttl_seconds=0)
    with pytest.raises(InvalidKeyError):
        store.put_request("bad id", record, ttl_seconds=5)


def test_redis_forgets_a_served_request_after_its_ttl(redis_url):
    import time

    store = RedisStore(redis_url, namespace="src")
    store.put_request("short", {"x": 1}, ttl_seconds=0.2)
    assert store.get_request("short") == {"x": 1}
    time.sleep(0.4)
    assert store.get_request("short") is None
    store.close()


# ---------------------------------------------------------------------- arrays
def test_named_arrays_round_trip_without_pickle(make_store, monkeypatch):
    store = make_store()

    def no_pickle(*args: object, **kw: object) -> None:
        raise AssertionError("pickle must not be used")

    monkeypatch.setattr(pickle, "dumps", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    rng = np.random.default_rng(2)
    arrays = {
        "mean": rng.standard_normal((3, 129)).astype(np.float32),
        "precision": rng.standard_normal((2, 2, 2)),
        "counts": np.arange(5, dtype=np.int64),
        "seen": np.array([True, False]),
        "ad_ids": np.array(["ad-1", "ad-ü"]),
        "scalar": np.float64(0.25),
        "empty": np.zeros((0, 4), np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
    }
    assert store.get_arrays("posterior") is None
    store.put_arrays("posterior", arrays)
    got = store.get_arrays("posterior")
    assert set(got) == set(arrays)
    for key, value in arrays.items():
        value = np.asarray(value)
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value)
    got["mean"][0, 0] = 99.0  # a copy, not a view of store internals
    store.put_arrays("posterior", {"mean": np.zeros(2)})  # replaces the whole dict
    assert set(store.get_arrays("posterior")) == {"mean"}


def _count_up_slowly(current: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Read-modify-write with a pause in between: last-write-wins would lose counts here."""
    count = np.zeros(1) if current is None else current["count"]
    time.sleep(0.002)
    return {"count": count + 1.0}


def test_concurrent_array_updates_from_threads_and_replicas_lose_none(make_store):
    replicas = [make_store() for _ in range(2)]
    n_threads, per_thread = 4, 10

    def worker(t: int) -> None:
        for _ in range(per_thread):
            replicas[t % 2].update_arrays("effects", _count_up_slowly)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert replicas[1].get_arrays("effects")["count"].tolist() == [n_threads * per_thread]


def test_an_array_update_returns_what_it_stored_and_a_failed_or_invalid_one_stores_nothing(make_store):
    store = make_store()
    stored = store.update_arrays(
        "posterior", lambda current: {"mean": np.arange(3.0), "seen": np.array([current is None])}
    )
    assert stored["mean"].tolist() == [0.0, 1.0, 2.0] and stored["seen"].tolist() == [True]
    before = snapshot(store)

    def boom(current: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        raise RuntimeError("merge failed")

    with pytest.raises(RuntimeError, match="merge failed"):
        store.update_arrays("posterior", boom)
    with pytest.raises(InvalidArraysError, match="posterior"):
        store.update_arrays("posterior", lambda current: {"mean": np.array([np.nan])})
    with pytest.raises(InvalidKeyError):
        store.update_arrays("", lambda current: {"mean": np.zeros(1)})
    assert snapshot(store) == before


# ---------------------------------------------------------------------- bad inputs
BAD_CALLS: list[tuple[str, type[Exception], Callable[[OnlineStore], object]]] = [
    ("raw user id", InvalidKeyError, lambda s: s.update_user(SPACE, "alice@example.com", lambda c: np.ones(D_USER))),
    ("upper-case pseudonym", InvalidKeyError, lambda s: s.update_user(SPACE, ALICE.upper(), lambda c: np.ones(D_USER))),
    ("short pseudonym", InvalidKeyError, lambda s: s.get_user(SPACE, ALICE[:-1])),
    ("pseudonym in a batch", InvalidKeyError, lambda s: s.get_users(SPACE, [ALICE, ""])),
    ("empty space", InvalidKeyError, lambda s: s.update_user("", ALICE, lambda c: np.ones(D_USER))),
    ("space with blank", InvalidKeyError, lambda s: s.get_user("users: x", ALICE)),
    ("empty ad id (retire)", InvalidKeyError, lambda s: s.retire_ad("")),
    ("non-str ad id", InvalidKeyError, lambda s: s.retire_ad(7)),
    ("empty ad id (live)", InvalidKeyError, lambda s: s.put_live_ad("", np.ones(D_CONTENT))),
    ("content vector wrong dim", InvalidVectorError, lambda s: s.put_live_ad("x", np.ones(D_USER))),
    ("content vector NaN", InvalidVectorError, lambda s: s.put_live_ad("x", np.full(D_CONTENT, np.nan))),
    ("content vector 2-d", InvalidVectorError, lambda s: s.put_live_ad("x", np.ones((1, D_CONTENT)))),
    ("meta not str", InvalidMetaError, lambda s: s.put_live_ad("x", np.ones(D_CONTENT), {"price": 3})),
    ("event NaN", InvalidEventError, lambda s: s.append_events([{"ok": 1}, {"score": float("nan")}])),
    ("event not a dict", InvalidEventError, lambda s: s.append_events([{"ok": 1}, ["click"]])),
    ("event int key", InvalidEventError, lambda s: s.append_events([{1: "click"}])),
    ("event numpy value", InvalidEventError, lambda s: s.append_events([{"pos": np.int64(1)}])),
    ("events not a list", InvalidEventError, lambda s: s.append_events({"kind": "click"})),
    ("limit 0", StoreInputError, lambda s: s.pending_events(0)),
    ("object array", InvalidArraysError, lambda s: s.put_arrays("posterior", {"a": np.array([{}, 1], dtype=object)})),
    ("NaN array", InvalidArraysError, lambda s: s.put_arrays("posterior", {"a": np.ones(2), "b": np.array([np.inf])})),
    ("empty blob name", InvalidKeyError, lambda s: s.put_arrays("", {"a": np.ones(2)})),
]


@pytest.mark.parametrize("what,error,call", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_a_specific_error_and_changes_nothing(make_store, what, error, call):
    store = make_store()
    store.update_user(SPACE, ALICE, lambda cur: np.ones(D_USER, np.float32))
    store.retire_ad("old")
    store.put_live_ad("live", np.ones(D_CONTENT, np.float32), {"t": "x"})
    store.append_events([{"kind": "click"}])
    store.put_arrays("posterior", {"a": np.arange(3.0)})
    before = snapshot(store)
    with pytest.raises(error) as info:
        call(store)
    assert isinstance(info.value, ValueError)
    assert snapshot(store) == before


def test_namespace_must_be_a_source_name(make_store):
    for bad in ("", "a:b", "a b", "{x}", None):
        with pytest.raises(InvalidKeyError, match="namespace"):
            make_store(bad)


# ---------------------------------------------------------------------- isolation, lifecycle
def test_namespaces_do_not_see_each_other(make_store):
    a, b = make_store("source-a"), make_store("source-b")
    a.update_user(SPACE, ALICE, lambda cur: np.ones(D_USER, np.float32))
    a.retire_ad("ad-1")
    a.put_live_ad("ad-2", np.ones(D_CONTENT, np.float32))
    seqs_a = a.append_events([{"kind": "click"}, {"kind": "click"}])
    a.put_arrays("posterior", {"x": np.ones(2)})
    assert b.get_user(SPACE, ALICE) is None
    assert b.retired_ads() == set() and not b.is_retired("ad-1")
    assert b.live_ads() == []
    assert b.pending_events() == []
    assert b.get_arrays("posterior") is None
    assert b.mark_flushed(10**12) == 0
    assert [s for s, _ in a.pending_events()] == seqs_a
    b.append_events([{"kind": "impression"}])
    assert [s for s, _ in a.pending_events()] == seqs_a
    assert b.drop_user_space(SPACE) == 0
    assert a.get_user(SPACE, ALICE) is not None


def test_ping_context_manager_and_closed_store(make_store):
    with make_store() as store:
        assert store.ping() is True
    assert store.ping() is False
    with pytest.raises(StoreClosedError):
        store.get_user(SPACE, ALICE)


# ---------------------------------------------------------------------- backend specifics
def test_open_store_picks_the_backend_by_url(tmp_path, redis_url):
    with (
        open_store(tmp_path / "x.sqlite3", namespace="s") as s1,
        open_store(str(tmp_path / "y.db"), namespace="s") as s2,
    ):
        assert isinstance(s1, SQLiteStore) and isinstance(s2, SQLiteStore)
    with open_store(redis_url, namespace="s") as s3:
        assert isinstance(s3, RedisStore) and s3.ping()
    assert "127.0.0.1" not in repr(s3)  # URLs may carry passwords
    with pytest.raises(StoreInputError, match="'postgres' is not supported"):
        open_store("postgres://db/x", namespace="s")
    assert not (tmp_path / "postgres:").exists() and not Path("postgres:").exists()


def test_sqlite_store_uses_wal_and_creates_its_folder(tmp_path):
    path = tmp_path / "deep" / "online" / "store.sqlite3"
    with SQLiteStore(path, namespace="s") as store:
        store.retire_ad("x")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_store_skips_the_fsync_of_slate_records_only(tmp_path):
    """A served slate's record commits without fsync (it is no event: lost in a power cut, its
    events are refused as unknown); every other write keeps synchronous=FULL, also after a
    slate write that failed."""
    with SQLiteStore(tmp_path / "store.sqlite3", namespace="s") as store:
        conn = store._conn()
        statements: list[str] = []
        conn.set_trace_callback(statements.append)

        def syncs() -> list[str]:
            return [s.split("=")[1] for s in statements if s.startswith("PRAGMA synchronous")]

        store.put_request("r1", {"user": "u", "ads": ["a"]}, 60)
        assert syncs() == ["NORMAL", "FULL"]
        assert statements.index("PRAGMA synchronous=NORMAL") < statements.index("BEGIN IMMEDIATE")
        assert statements.index("COMMIT") < statements.index("PRAGMA synchronous=FULL")
        statements.clear()
        store.append_events([{"event_id": "e1"}])
        store.update_user("users:aaaa1111", "0123456789abcdef0123456789abcdef", lambda cur: np.ones(128, np.float32))
        assert syncs() == [] and "COMMIT" in statements  # events and user vectors: fsynced as the store is
        conn.set_trace_callback(None)
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        with sqlite3.connect(tmp_path / "store.sqlite3") as other:  # another writer holds the lock
            other.execute("BEGIN IMMEDIATE")
            store._busy_ms = 50
            conn.execute("PRAGMA busy_timeout=50")
            with pytest.raises(StoreUnavailableError):
                store.put_request("r2", {"user": "u", "ads": ["a"]}, 60)
            other.execute("ROLLBACK")
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    with SQLiteStore(tmp_path / "normal.sqlite3", namespace="s", synchronous="NORMAL") as store:
        statements = []
        store._conn().set_trace_callback(statements.append)
        store.put_request("r1", {"user": "u", "ads": ["a"]}, 60)
        assert not [s for s in statements if s.startswith("PRAGMA")]  # nothing to relax


def test_sqlite_relaxed_write_whose_restore_fails_releases_the_lock_and_discards_the_connection(tmp_path):
    """Fault injection: when FULL cannot be restored (the connection still in a transaction,
    an I/O error), the write lock is released anyway, the original error is the one raised,
    and the connection is thrown away, so no later write can run on it without its fsync."""

    class Faulty:
        """A real connection whose restore of synchronous=FULL (and, if asked, BEGIN) fails."""

        def __init__(self, conn: sqlite3.Connection, fail_begin: bool) -> None:
            self.conn, self.fail_begin = conn, fail_begin

        @property
        def in_transaction(self) -> bool:
            return self.conn.in_transaction

        def execute(self, sql: str, *args):
            if sql == "PRAGMA synchronous=FULL" or (self.fail_begin and sql == "BEGIN IMMEDIATE"):
                raise sqlite3.OperationalError(f"injected: {sql}")
            return self.conn.execute(sql, *args)

    with SQLiteStore(tmp_path / "store.sqlite3", namespace="s") as store:
        for fail_begin in (False, True):
            real = store._conn()
            discarded: list = []

            def discard(conn, real=real, discarded=discarded) -> None:
                discarded.append(conn)
                store._discard(real)

            lock = threading.Lock()
            write = SQLiteStore._Write(Faulty(real, fail_begin), lock, 1.0, relax=True, discard=discard)
            if fail_begin:
                with pytest.raises(sqlite3.OperationalError, match="injected: BEGIN"), write:
                    pass
            else:
                with write as conn:
                    conn.execute("INSERT INTO retired_ads VALUES (?, ?, ?)", ("s", "ad-x", 0.0))
            assert not lock.locked()  # the lock is free again
            assert len(discarded) == 1  # the connection that may be at NORMAL is gone
            fresh = store._conn()
            assert fresh is not real and fresh.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert store.is_retired("ad-x")  # the relaxed write itself committed


def test_sqlite_store_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "store.sqlite3"
    SQLiteStore(path, namespace="s").close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(StoreFormatError, match="v99"):
        SQLiteStore(path, namespace="s")


_PROCESS_WORKER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from adrec_assets.online.store import SQLiteStore

    path, n, ready, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    open(ready, "w").close()
    while not os.path.exists(go):  # start together: the updates must really overlap
        time.sleep(0.01)
    def inc(cur):
        new = np.zeros(128, np.float32) if cur is None else cur
        time.sleep(0.002)
        new[0] += 1.0
        return new
    with SQLiteStore(path, namespace="s") as store:
        for _ in range(n):
            store.update_user("users:aaaa1111", "0123456789abcdef0123456789abcdef", inc)
            store.append_events([{"pid": 1}])
    """
)


def test_sqlite_two_processes_updating_one_user_lose_no_update(tmp_path):
    path = tmp_path / "store.sqlite3"
    SQLiteStore(path, namespace="s").close()
    n = 40
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_WORKER, str(path), str(n), str(r), str(go)],
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    with SQLiteStore(path, namespace="s") as store:
        state = store.get_user_state(SPACE, ALICE)
        assert state.vector[0] == 2 * n and state.n_updates == 2 * n
        seqs = [s for s, _ in store.pending_events(limit=1000)]
        assert len(seqs) == 2 * n and len(set(seqs)) == 2 * n


def test_redis_update_gives_up_after_its_retry_budget(redis_url):
    """WATCH conflicts are retried, but not forever: a user hammered by another writer on
    every attempt yields ConcurrentUpdateError and the other writer's value stays."""
    with (
        RedisStore(redis_url, namespace="retry", max_update_retries=3) as store,
        RedisStore(redis_url, namespace="retry") as other,
    ):
        calls = []

        def interfering(cur: np.ndarray | None) -> np.ndarray:
            calls.append(1)
            other.update_user(SPACE, ALICE, lambda c: np.full(D_USER, 7.0, np.float32))  # races us
            return np.zeros(D_USER, np.float32)

        with pytest.raises(ConcurrentUpdateError, match="3 races"):
            store.update_user(SPACE, ALICE, interfering)
        assert len(calls) == 3
        np.testing.assert_array_equal(store.get_user(SPACE, ALICE), np.full(D_USER, 7.0))
        assert store.get_user_state(SPACE, ALICE).n_updates == 3


def test_redis_array_update_gives_up_after_its_retry_budget_and_keeps_the_other_writers_blob(redis_url):
    with (
        RedisStore(redis_url, namespace="retry-arrays", max_update_retries=3) as store,
        RedisStore(redis_url, namespace="retry-arrays") as other,
    ):
        calls = []

        def interfering(current: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
            calls.append(1)
            other.put_arrays("effects", {"mean": np.full(2, 7.0)})  # races us
            return {"mean": np.zeros(2)}

        with pytest.raises(ConcurrentUpdateError, match=r"update_arrays\('effects'\) lost 3 races"):
            store.update_arrays("effects", interfering)
        assert len(calls) == 3
        np.testing.assert_array_equal(store.get_arrays("effects")["mean"], np.full(2, 7.0))
