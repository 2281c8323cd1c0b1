"""Every accepted event exactly once, counted by event id, whatever runs at the same moment,
fails or dies (issue 28, classes 1, 2 and the first half of 8):

* identical events posted at once (threads, two service instances over one SQLite file or
  one Redis, several processes) are applied once: one claim of the event's key in the store;
* a flush that fails or a flusher killed between writing its files and marking the batch
  finishes exactly that batch under exactly that name later: no event or click twice;
* a fresh store (a new SQLite file, Redis emptied) never replaces files already written;
* clicks without their impression leave nothing behind in the service's memory.

Stores are real: a SQLite file and a throw-away ``redis-server`` (skipped, saying why, where
it is absent), plus the in-memory backend.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from adrec_assets.online.events import EVENT_SCHEMA, EVENTS_DIRNAME, EventFlusher
from adrec_assets.online.store import MemoryState, MemoryStore, OnlineStore, RedisStore, SQLiteStore
from adrec_assets.sources.files import CLICKS_DIRNAME
from adrec_assets_tests.redis_server import redis_server

REPO_ROOT = Path(__file__).resolve().parents[1]
ALICE = "0123456789abcdef0123456789abcdef"
KNOWN = frozenset({"ad-1", "ad-2"})


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")
    with redis_server() as url:
        yield url


def _flush_redis(url: str) -> None:
    import redis

    with redis.Redis.from_url(url) as admin:
        admin.flushdb()


@pytest.fixture(params=["sqlite", "redis", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Callable[..., OnlineStore]]]:
    """(kind, factory): every store the factory opens shares ONE backing state (another
    replica, a reopen)."""
    opened: list[OnlineStore] = []
    if request.param == "memory":
        state = MemoryState()

        def make(**kw: object) -> OnlineStore:
            opened.append(MemoryStore("src", state=state, **kw))
            return opened[-1]
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        _flush_redis(url)

        def make(**kw: object) -> OnlineStore:
            opened.append(RedisStore(url, namespace="src", **kw))
            return opened[-1]
    else:
        path = tmp_path / "online" / "store.sqlite3"

        def make(**kw: object) -> OnlineStore:
            opened.append(SQLiteStore(path, namespace="src", **kw))
            return opened[-1]

    yield request.param, make
    for store in opened:
        store.close()


def event_row(event_id: str, kind: str = "impression", ad_id: str = "ad-1", stamp: float = 1.0) -> dict[str, object]:
    row: dict[str, object] = {field.name: None for field in EVENT_SCHEMA}
    row.update(event_id=event_id, request_id="r" * 32, user_pseudonym=ALICE, type=kind, ad_id=ad_id, position=0,
               timestamp=stamp, served_at=1.0, weight=1.0)  # fmt: skip
    return row


def click_row(number: int) -> dict[str, object]:
    """A click on a catalogue ad with its own timestamp (so a click file row names its event)."""
    return event_row(f"c{number}", "click", "ad-1", stamp=1_800_000_000.0 + number)


def events_in_files(folder: Path) -> Counter:
    """How often each event id appears over every file of ``events/``."""
    return Counter(
        i for p in sorted((folder / EVENTS_DIRNAME).glob("*.parquet")) for i in pq.read_table(p)["event_id"].to_pylist()
    )


def clicks_in_files(folder: Path) -> Counter:
    """How often each click appears over every file of ``clicks/``, a click named by its
    (pseudonym, ad, timestamp): what the pipeline trains on."""
    return Counter(
        (r["user_pseudonym"], r["ad_id"], r["timestamp"])
        for p in sorted((folder / CLICKS_DIRNAME).glob("*.parquet"))
        for r in pq.read_table(p).to_pylist()
    )


def assert_each_once(folder: Path, event_ids: list[str], clicks: list[int]) -> None:
    assert events_in_files(folder) == Counter(event_ids)
    assert clicks_in_files(folder) == Counter((ALICE, "ad-1", 1_800_000_000 + n) for n in clicks)


# ================================================================ class 1: one claim per event
def test_identical_events_appended_at_once_by_threads_and_replicas_are_queued_once(backend):
    _, make = backend
    replicas = [make(), make()]
    keys = [f"{'a' * 32}:{p}:click" for p in range(20)]
    barrier = threading.Barrier(8)
    won: list[list[bool]] = [[] for _ in range(8)]

    def post(t: int) -> None:
        barrier.wait(timeout=30)
        seqs = replicas[t % 2].append_events_once([(k, event_row(k, "click")) for k in keys], ttl_seconds=60)
        won[t] = [s is not None for s in seqs]

    threads = [threading.Thread(target=post, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [sum(w[i] for w in won) for i in range(len(keys))] == [1] * len(keys)  # one winner per key
    queued = Counter(row["event_id"] for _, row in replicas[0].pending_events(1000))
    assert queued == Counter(keys)
    assert replicas[1].recorded_events([*keys, "never-posted"]) == [True] * len(keys) + [False]


def test_a_repeated_key_in_one_batch_is_queued_once_and_a_bad_row_queues_nothing(backend):
    _, make = backend
    store = make()
    seqs = store.append_events_once([("k1", event_row("k1")), ("k1", event_row("k1")), ("k2", event_row("k2"))], 60)
    assert seqs[0] is not None and seqs[1] is None and seqs[2] > seqs[0]
    with pytest.raises(ValueError):
        store.append_events_once([("k3", event_row("k3")), ("k4", {"x": float("nan")})], 60)
    with pytest.raises(ValueError):
        store.append_events_once([("bad key", event_row("k5"))], 60)
    assert store.recorded_events(["k3", "k4", "k5"]) == [False, False, False]  # validated before anything
    assert [row["event_id"] for _, row in store.pending_events()] == ["k1", "k2"]


def test_a_claim_lasts_its_ttl(backend):
    kind, make = backend
    clock = [1000.0]
    store = make(clock=lambda: clock[0])
    ttl = 60.0 if kind != "redis" else 0.3  # Redis expires by its own (real) clock
    assert store.append_events_once([("k", event_row("k"))], ttl)[0] is not None
    assert store.append_events_once([("k", event_row("k"))], ttl) == [None]
    if kind == "redis":
        time.sleep(ttl + 0.2)
    else:
        clock[0] += ttl + 1
    assert store.recorded_events(["k"]) == [False]
    assert store.append_events_once([("k", event_row("k"))], ttl)[0] is not None


_CLAIM_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from adrec_assets.online.store import open_store

    where, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
    store = open_store(where, namespace="src")
    open(ready, "w").close()
    while not os.path.exists(go):  # start together: the claims must really overlap
        time.sleep(0.005)
    won = 0
    for i in range(50):
        key = f"{'b' * 32}:{i}:click"
        won += store.append_events_once([(key, {"event_id": key, "pid": os.getpid()})], 60)[0] is not None
    store.close()
    print(won)
    """
)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_processes_posting_the_same_events_at_once_queue_each_exactly_once(kind, tmp_path, request):
    if kind == "redis":
        where = request.getfixturevalue("redis_url")
        _flush_redis(where)
    else:
        where = str(tmp_path / "store.sqlite3")
        SQLiteStore(where, namespace="src").close()
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIM_WORKER, where, str(r), str(go)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for r in ready
    ]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()
    won = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        won += int(out)
    assert won == 50
    store = RedisStore(where, namespace="src") if kind == "redis" else SQLiteStore(where, namespace="src")
    with store:
        assert Counter(row["event_id"] for _, row in store.pending_events(1000)) == Counter(
            f"{'b' * 32}:{i}:click" for i in range(50)
        )


# ================================================================ class 2: files written once
def test_a_store_keeps_its_epoch_and_a_fresh_store_has_another(backend, tmp_path):
    kind, make = backend
    store = make()
    epoch = store.epoch()
    assert epoch == store.epoch() == make().epoch()  # stable, shared by replicas and reopens
    fresh = {"sqlite": lambda: SQLiteStore(tmp_path / "other.sqlite3", namespace="src"),
             "memory": lambda: MemoryStore("src"),
             "redis": lambda: (_flush_redis(store.url), make())[1]}[kind]()  # fmt: skip
    assert fresh.epoch() != epoch
    fresh.close()


def test_a_v1_sqlite_file_is_upgraded_in_place_and_keeps_its_queue(tmp_path):
    import sqlite3

    path = tmp_path / "store.sqlite3"
    with SQLiteStore(path, namespace="src") as store:
        store.append_events([event_row("old")])
    with sqlite3.connect(path) as conn:  # what the previous version left: no claims, no epoch
        conn.execute("DROP TABLE claims")
        conn.execute("DROP TABLE meta")
        conn.execute("PRAGMA user_version=1")
    with SQLiteStore(path, namespace="src") as store:
        assert [row["event_id"] for _, row in store.pending_events()] == ["old"]
        assert store.append_events_once([("new", event_row("new"))], 60)[0] is not None
        assert store.epoch() == store.epoch()


def test_a_flush_that_fails_before_marking_is_finished_later_under_the_same_name(backend, tmp_path):
    _, make = backend
    store, folder = make(), tmp_path / "source"
    flusher = EventFlusher(store, folder)
    store.append_events([event_row("i0"), click_row(0), click_row(1)])
    real_mark = store.mark_flushed
    store.mark_flushed = lambda seq: (_ for _ in ()).throw(OSError("injected: store gone after the files"))
    with pytest.raises(OSError, match="injected"):
        flusher.flush(100, known_ads=KNOWN)
    store.mark_flushed = real_mark
    store.append_events([event_row("i1"), click_row(2)])  # more events meanwhile
    names = sorted(p.name for p in (folder / EVENTS_DIRNAME).glob("*.parquet"))
    assert flusher.flush(100, known_ads=KNOWN) == 3  # exactly the failed batch again ...
    assert sorted(p.name for p in (folder / EVENTS_DIRNAME).glob("*.parquet")) == names  # ... under its name
    assert flusher.flush(100, known_ads=KNOWN) == 2
    assert flusher.flush(100, known_ads=KNOWN) == 0
    assert_each_once(folder, ["i0", "c0", "c1", "i1", "c2"], [0, 1, 2])


def test_another_replica_finishes_the_batch_a_failed_flusher_left(backend, tmp_path):
    _, make = backend
    store_a, store_b, folder = make(), make(), tmp_path / "source"
    a, b = EventFlusher(store_a, folder), EventFlusher(store_b, folder)
    store_a.append_events([click_row(0), click_row(1)])
    store_a.mark_flushed = lambda seq: (_ for _ in ()).throw(OSError("injected"))
    with pytest.raises(OSError):
        a.flush(100, known_ads=KNOWN)
    a.release()  # (or its lease expires)
    store_b.append_events([click_row(2)])
    assert b.flush(1, known_ads=KNOWN) == 2  # the whole left batch, whatever b's batch size
    assert b.flush(1, known_ads=KNOWN) == 1
    assert_each_once(folder, ["c0", "c1", "c2"], [0, 1, 2])


def _flush_and_die(make_args: tuple, folder: str, kill_at: str) -> None:
    """Child process: flush once and SIGKILL itself at ``kill_at``."""
    import pyarrow.parquet as child_pq

    kind, where = make_args
    store = RedisStore(where, namespace="src") if kind == "redis" else SQLiteStore(where, namespace="src")
    real_write, real_mark = child_pq.write_table, store.mark_flushed
    writes = [0]

    def write_table(*args, **kwargs):
        real_write(*args, **kwargs)
        writes[0] += 1
        if kill_at == "after-events-file" and writes[0] == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def mark_flushed(seq):
        if kill_at == "before-mark":
            os.kill(os.getpid(), signal.SIGKILL)
        done = real_mark(seq)
        if kill_at == "after-mark":
            os.kill(os.getpid(), signal.SIGKILL)
        return done

    child_pq.write_table = write_table
    store.mark_flushed = mark_flushed
    EventFlusher(store, Path(folder), lease_seconds=0.5).flush(100, known_ads=KNOWN)
    os._exit(3)  # not killed: the test fails on the exit code


@pytest.mark.parametrize("kill_at", ["after-events-file", "before-mark", "after-mark"])
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_flusher_killed_mid_flush_leaves_every_event_and_click_exactly_once(kind, kill_at, tmp_path, request):
    if kind == "redis":
        where = request.getfixturevalue("redis_url")
        _flush_redis(where)
        open_ = lambda: RedisStore(where, namespace="src")  # noqa: E731
    else:
        where = str(tmp_path / "store.sqlite3")
        open_ = lambda: SQLiteStore(where, namespace="src")  # noqa: E731
    folder = tmp_path / "source"
    with open_() as store:
        store.append_events([event_row("i0"), click_row(0), click_row(1)])
    child = multiprocessing.get_context("fork").Process(
        target=_flush_and_die, args=((kind, where), str(folder), kill_at)
    )
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL, f"the child was not killed at {kill_at} (exit {child.exitcode})"
    time.sleep(0.6)  # the dead flusher's lease expires
    with open_() as store:
        store.append_events([click_row(2), event_row("i1")])
        flusher = EventFlusher(store, folder)
        while flusher.flush(100, known_ads=KNOWN):
            pass
        assert store.pending_events() == []
    assert_each_once(folder, ["i0", "c0", "c1", "c2", "i1"], [0, 1, 2])
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("kind", ["sqlite", "redis", "memory"])
def test_a_fresh_store_over_an_existing_source_folder_never_replaces_its_files(kind, tmp_path, request):
    """A new SQLite path or a Redis restarted without persistence numbers its events from 1
    again; the files already written stay, and every event and click is there once."""
    folder = tmp_path / "source"
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        _flush_redis(url)
        stores = [RedisStore(url, namespace="src") for _ in range(2)]
    elif kind == "sqlite":
        stores = [SQLiteStore(tmp_path / f"store-{i}.sqlite3", namespace="src") for i in range(2)]
    else:
        stores = [MemoryStore("src") for _ in range(2)]
    first, fresh = stores
    first.append_events([click_row(0), click_row(1), event_row("i0")])
    assert EventFlusher(first, folder).flush(100, known_ads=KNOWN) == 3
    if kind == "redis":
        _flush_redis(url)  # the restart without persistence: queue, counter, leases, all gone
    fresh.append_events([click_row(2), click_row(3), event_row("i1")])
    assert EventFlusher(fresh, folder).flush(100, known_ads=KNOWN) == 3
    assert_each_once(folder, ["c0", "c1", "i0", "c2", "c3", "i1"], [0, 1, 2, 3])
    for store in stores:
        store.close()


def test_a_name_taken_by_other_events_is_refused_never_replaced(tmp_path):
    """Two stores that somehow share an epoch (or a file copied in by hand): the flusher
    refuses to write over a file holding other events, keeps its batch queued, and says why."""
    from adrec_assets.online.events import FlushConflictError

    folder = tmp_path / "source"
    first, second = MemoryStore("src"), MemoryStore("src")
    second.epoch = first.epoch  # type: ignore[method-assign]
    first.append_events([click_row(0)])
    EventFlusher(first, folder).flush(100, known_ads=KNOWN)
    before = {p: p.read_bytes() for p in folder.rglob("*.parquet")}
    second.append_events([click_row(1)])
    with pytest.raises(FlushConflictError, match="other events"):
        EventFlusher(second, folder).flush(100, known_ads=KNOWN)
    assert {p: p.read_bytes() for p in folder.rglob("*.parquet")} == before
    assert len(second.pending_events()) == 1


def test_flushed_click_files_still_read_as_a_click_source(tmp_path):
    from adrec_assets.sources.files import read_clicks

    folder = tmp_path / "shop"
    store = MemoryStore("shop")
    store.append_events([click_row(0), click_row(1), event_row("i0")])
    EventFlusher(store, folder).flush(100, known_ads=KNOWN)
    clicks, _ = read_clicks(folder, np.asarray(["ad-1", "ad-2"], dtype=object), source="shop")
    assert len(clicks.user_codes) == 2 and clicks.pseudonymized.all()


# ================================================================ through the service
@pytest.fixture(scope="module")
def published(default_pipeline) -> Path:
    base, result, _ = default_pipeline
    assert result.success
    return base


def _service(base: Path, sources: Path, store: OnlineStore, **config):
    from adrec_assets.online.config import ServingConfig
    from adrec_assets.online.service import RecommendationService
    from adrec_assets_tests.pipeline_fixtures import id_key

    settings = {"source": "synthetic", "artifacts_root": base, "sources_root": sources, "seed": 7,
                "load_encoder": False, "flush_seconds": 3600, **config}  # fmt: skip
    with id_key():
        service = RecommendationService(ServingConfig(**settings), store)
        service.start(background=False)
    return service


def _stores(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> list[OnlineStore]:
    """The stores of the services: one ("threads"), or two over one SQLite file / one Redis."""
    if kind == "threads":
        return [SQLiteStore(tmp_path / "online.sqlite", namespace="synthetic")]
    if kind == "two-services-sqlite":
        return [SQLiteStore(tmp_path / "online.sqlite", namespace="synthetic") for _ in range(2)]
    url = request.getfixturevalue("redis_url")
    _flush_redis(url)
    return [RedisStore(url, namespace="synthetic") for _ in range(2)]


@pytest.mark.parametrize("kind", ["threads", "two-services-sqlite", "two-services-redis"])
def test_identical_clicks_posted_at_the_same_moment_are_applied_exactly_once(published, tmp_path, request, kind):
    """Ten posts of one click, each past the "already recorded?" read before any goes on
    (a barrier right after the served request is read: the interleaving that accepted it ten
    times): one is accepted, nine are duplicates, the user's vector moves once, the event
    and its training click are written once."""
    from adrec_assets.privacy import pseudonymize
    from adrec_assets_tests.pipeline_fixtures import TEST_ID_KEY, id_key

    sources = tmp_path / "sources"
    services = [_service(published, sources, store) for store in _stores(kind, tmp_path, request)]
    n = 10
    barrier = threading.Barrier(n)
    for service in services:
        real_get = service.online.get_request

        def get_request(request_id: str, real_get=real_get):
            record = real_get(request_id)
            barrier.wait(timeout=30)  # every post has read the record before any goes on
            return record

        service.online.get_request = get_request  # type: ignore[method-assign]
    user = "user-0000005"
    with id_key():
        served = services[0].recommend(user, 5)
    click = {"request_id": served["request_id"], "user_id": user, "ad_id": served["items"][2]["ad_id"],
             "position": 2, "type": "click", "timestamp": time.time()}  # fmt: skip
    results: list[dict] = [{} for _ in range(n)]

    def post(t: int) -> None:
        results[t] = services[t % len(services)].record_events([dict(click)])

    with id_key():
        threads = [threading.Thread(target=post, args=(t,)) for t in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(r["accepted"] for r in results) == 1 and sum(r["duplicates"] for r in results) == n - 1
    assert sum(r["clicks"] for r in results) == 1
    event_id = f"{served['request_id']}:2:click"
    pending = Counter(row["event_id"] for _, row in services[-1].online.pending_events(1000))
    assert pending[event_id] == 1
    state = services[0].online.get_user_state(services[0].state.space, pseudonymize(user, TEST_ID_KEY.encode()))
    assert state is not None and state.n_updates == 1  # the vector moved once
    for service in services:
        service.flush()
    folder = sources / "synthetic"
    assert events_in_files(folder)[event_id] == 1
    assert sum(1 for p in (folder / CLICKS_DIRNAME).glob("*.parquet") for _ in pq.read_table(p).to_pylist()) == 1
    for service in services:
        service.online.close()


def test_clicks_without_their_impression_leave_nothing_behind_in_memory(published, tmp_path):
    """The README's curl example posts a click alone. Whatever the service keeps to settle
    impressions with their clicks must not grow with such clicks once their settle window
    passed (it used to keep each one forever)."""
    from adrec_assets_tests.pipeline_fixtures import id_key

    service = _service(published, tmp_path / "sources", SQLiteStore(tmp_path / "online.sqlite", namespace="synthetic"),
                       settle_seconds=5.0)  # fmt: skip

    def sizes() -> dict[str, int]:
        return {name: len(value) for name, value in vars(service).items() if isinstance(value, (list, set, dict))}

    def lone_clicks(count: int) -> None:
        for number in range(count):
            user = f"user-{number % 40:07d}"
            served = service.recommend(user, 3)
            service.record_events([{"request_id": served["request_id"], "user_id": user, "position": 1,
                                    "ad_id": served["items"][1]["ad_id"], "type": "click",
                                    "timestamp": time.time()}])  # fmt: skip

    with id_key():
        lone_clicks(20)
        service.settle(now=time.time() + 10)
        before = sizes()
        for _ in range(3):
            lone_clicks(100)
            service.settle(now=time.time() + 10)
        after = sizes()
    grown = {name: after[name] - before.get(name, 0) for name in after if after[name] - before.get(name, 0) >= 50}
    assert grown == {}, f"grows with every click that has no impression: {grown}"
    service.online.close()


def test_an_impression_settles_as_clicked_when_its_click_came_first_or_went_to_another_replica(
    published, tmp_path, monkeypatch
):
    """What the settle logic needs from the clicks: an impression is learnt as clicked when
    its click was recorded, whether the click arrived before it or at another replica."""
    from adrec_assets_tests.pipeline_fixtures import id_key

    path = tmp_path / "online.sqlite"
    a, b = (_service(published, tmp_path / "sources", SQLiteStore(path, namespace="synthetic"), settle_seconds=5.0)
            for _ in range(2))  # fmt: skip
    outcomes: list[list[float]] = []
    real_update = a.state.posterior.update_position_aware

    def update(users, ads, clicked, positions, theta):
        outcomes.append(np.asarray(clicked).tolist())
        return real_update(users, ads, clicked, positions, theta)

    monkeypatch.setattr(a.state.posterior, "update_position_aware", update)
    with id_key():
        served = a.recommend("user-0000005", 3)
        event = {"request_id": served["request_id"], "user_id": "user-0000005", "timestamp": time.time()}
        b.record_events([{**event, "position": 0, "ad_id": served["items"][0]["ad_id"], "type": "click"}])
        a.record_events([{**event, "position": 1, "ad_id": served["items"][1]["ad_id"], "type": "click"}])
        a.record_events([{**event, "position": p, "ad_id": served["items"][p]["ad_id"], "type": "impression"}
                         for p in range(3)])  # fmt: skip
        assert a.settle(now=time.time() + 10) == 3
    assert outcomes == [[1.0, 1.0, 0.0]]
    for service in (a, b):
        service.online.close()
