"""The service when its store, disk or writers misbehave (issue 28, classes 3, 4, 6 and 8), over
the session's published synthetic snapshot:

* class 3 / 4, outages: a store that is down, stalled, locked or out of disk never turns a
  read into an error (the slate is served from the snapshot and marked ``recorded: false``),
  writes answer 503 with ``Retry-After`` and change nothing, ``/healthz`` says ``degraded``
  with the reason, and a stalled store call never stalls the event loop (``/healthz`` and
  ``/metrics`` answer while it waits); a failing flush is reported too;
* class 6, concurrent writes of one ad id: one atomic claim in the store, so of two replicas
  adding one id exactly one wins, and only its image is stored; a retired live ad can be added
  again; an id that cannot be a path segment is refused;
* class 8, slow leaks: an idle reload poll reads one counter, not every live ad.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from adrec_assets.online.api import create_app
from adrec_assets.online.service import Conflict, RecommendationService
from adrec_assets.online.state import is_live
from adrec_assets.online.store import MemoryState, MemoryStore, OnlineStore, RedisStore, SQLiteStore
from adrec_assets.online.store.base import CONTENT_DIM
from adrec_assets_tests.pipeline_fixtures import id_key
from adrec_assets_tests.redis_server import redis_server
from adrec_assets_tests.test_service import KNOWN_USER, make_service, png_bytes


@pytest.fixture(scope="module")
def published(default_pipeline) -> Path:
    base, result, _ = default_pipeline
    assert result.success
    return base


def started(service: RecommendationService) -> RecommendationService:
    with id_key():
        service.start(background=False)
    return service


def replica(published: Path, tmp_path: Path, store: OnlineStore, **config) -> RecommendationService:
    """A started service over ``store`` (replicas share one)."""
    service = make_service(published, tmp_path, **config)
    service.online.close()
    service.online = store
    service.flusher.store = store
    return started(service)


def content(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(CONTENT_DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def event_of(served: dict, kind: str = "impression") -> dict:
    return {"request_id": served["request_id"], "user_id": KNOWN_USER, "ad_id": served["items"][0]["ad_id"],
            "position": 0, "type": kind, "timestamp": time.time()}  # fmt: skip


# ---------------------------------------------------------------- class 6: one ad id, many writers
def test_two_replicas_adding_one_id_at_once_one_wins_and_both_serve_its_text_and_image(published, tmp_path):
    """Replica B has not seen A's add yet (its state says the id is free): the store's claim
    refuses it, and B's image never overwrites A's."""
    path = tmp_path / "online.sqlite"
    a = replica(published, tmp_path / "a", SQLiteStore(path, namespace="synthetic"))
    b = replica(published, tmp_path / "b", SQLiteStore(path, namespace="synthetic"))
    first, second = png_bytes((10, 200, 10)), png_bytes((200, 10, 10))
    a.add_ad("fresh-1", "text of A", first, content=content(1))
    with pytest.raises(Conflict) as refused:
        b.add_ad("fresh-1", "text of B", second, content=content(2))
    assert refused.value.field == "ad_id" and "already exists" in refused.value.message
    b.sync_live_ads()
    for service in (a, b):
        assert service.ad_info(service.state, "fresh-1")["text"] == "text of A"
        assert service.ad_image("fresh-1") == first
    assert len(a.online.live_ads()) == 1


@pytest.mark.parametrize("kind", ["sqlite", "memory", "redis"])
def test_threads_adding_one_id_at_once_store_it_exactly_once(kind, tmp_path):
    stores: list[OnlineStore] = []
    with contextlib.ExitStack() as stack:
        if kind == "redis":
            pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")
            url = stack.enter_context(redis_server())
            stores = [RedisStore(url, namespace="src") for _ in range(6)]
        elif kind == "memory":
            state = MemoryState()
            stores = [MemoryStore("src", state=state) for _ in range(6)]
        else:
            stores = [SQLiteStore(tmp_path / "s.sqlite3", namespace="src") for _ in range(6)]
        barrier = threading.Barrier(len(stores))
        results: list[float | None] = [None] * len(stores)

        def add(i: int) -> None:
            barrier.wait()
            results[i] = stores[i].add_live_ad("ad-x", content(i), {"text": f"copy {i}"})

        threads = [threading.Thread(target=add, args=(i,)) for i in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [i for i, r in enumerate(results) if r is not None]
        assert len(winners) == 1, results
        (live,) = stores[0].live_ads()
        assert live.meta["text"] == f"copy {winners[0]}" and live.added_at == results[winners[0]]
        stores[0].retire_ad("ad-x")  # a retired ad may be added again, once
        assert stores[1].add_live_ad("ad-x", content(9), {"text": "again"}) is not None
        assert not stores[2].is_retired("ad-x") and stores[2].add_live_ad("ad-x", content(9), {}) is None
        for store in stores:
            store.close()


def test_a_retired_live_ad_can_be_added_again_and_every_replica_serves_the_new_copy(published, tmp_path):
    path = tmp_path / "online.sqlite"
    a = replica(published, tmp_path / "a", SQLiteStore(path, namespace="synthetic"))
    b = replica(published, tmp_path / "b", SQLiteStore(path, namespace="synthetic"))
    a.add_ad("fresh-2", "first copy", None, content=content(3))
    b.sync_live_ads()
    a.retire_ad("fresh-2")
    b.sync_live_ads()
    assert not is_live(b.state.index, "fresh-2")
    answer = a.add_ad("fresh-2", "second copy", None, content=content(4))
    assert answer["ad_id"] == "fresh-2"
    assert b.sync_live_ads() == 1
    for service in (a, b):
        assert service.ad_info(service.state, "fresh-2")["text"] == "second copy"
        assert is_live(service.state.index, "fresh-2")
    catalogue_ad = a.state.catalog.ad_ids[0]
    a.retire_ad(catalogue_ad)
    with pytest.raises(Conflict, match="catalogue ads come back through the source"):
        a.add_ad(catalogue_ad, "a new text", None, content=content(5))


def test_an_ad_id_that_cannot_be_a_path_segment_is_refused(published, tmp_path):
    service = started(make_service(published, tmp_path, api_token="t" * 20))
    with id_key(), TestClient(create_app(service, start=False), raise_server_exceptions=False) as client:
        for bad in ("a/b", "tab\there", " padded", "padded "):
            response = client.post("/v1/ads", json={"ad_id": bad, "text": "copy"},
                                   headers={"Authorization": "Bearer " + "t" * 20})  # fmt: skip
            assert response.status_code == 422, (bad, response.text)
            assert response.json()["field"] == "ad_id", response.json()
    assert service.online.live_ads() == []


# ---------------------------------------------------------------- class 8: the reload poll
def test_an_idle_reload_poll_reads_no_live_ad_and_a_change_reads_them_once(published, tmp_path, monkeypatch):
    path = tmp_path / "online.sqlite"
    a = replica(published, tmp_path / "a", SQLiteStore(path, namespace="synthetic"))
    for i in range(30):
        a.add_ad(f"live-{i}", f"copy {i}", None, content=content(100 + i))
    b = replica(published, tmp_path / "b", SQLiteStore(path, namespace="synthetic"))
    assert all(f"live-{i}" in b.state.live_meta for i in range(30))
    reads = []
    original = SQLiteStore._live_ads
    monkeypatch.setattr(SQLiteStore, "_live_ads", lambda self: reads.append(1) or original(self))
    for _ in range(5):
        b.refresh()
    assert reads == [], "an idle poll read the live ads"
    added = []
    original_add = b.state.index.add  # this replica's index only (a adds to its own)
    monkeypatch.setattr(b.state.index, "add", lambda *args: added.append(args[0]) or original_add(*args))
    a.add_ad("live-new", "newest", None, content=content(999))
    b.refresh()
    assert reads == [1] and added == ["live-new"], (reads, added)
    b.refresh()
    assert reads == [1]


# ---------------------------------------------------------------- classes 3 and 4: outages
def test_a_stalled_store_call_does_not_stall_health_or_metrics(published, tmp_path, monkeypatch):
    """One recommendation waits in the store; /healthz and /metrics still answer at once."""
    service = started(make_service(published, tmp_path))
    release = threading.Event()
    original = SQLiteStore._get_users

    def stalled(self, space, pseudonyms):
        release.wait(10)
        return original(self, space, pseudonyms)

    monkeypatch.setattr(SQLiteStore, "_get_users", stalled)
    app = create_app(service, start=False)

    async def scenario() -> tuple[float, float, int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            slow = asyncio.create_task(client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 3}))
            await asyncio.sleep(0.3)  # the recommendation is now waiting in the store
            began = time.monotonic()
            health = await client.get("/healthz")
            metrics = await client.get("/metrics")
            waited = time.monotonic() - began
            release.set()
            answer = await slow
            return waited, health.status_code + metrics.status_code, answer.status_code

    timer = threading.Timer(5.0, release.set)  # bounds the test if the loop is blocked
    timer.start()
    try:
        with id_key():
            waited, statuses, slow_status = asyncio.run(scenario())
    finally:
        timer.cancel()
        release.set()
    assert statuses == 400 and slow_status == 200
    assert waited < 2.0, f"/healthz and /metrics waited {waited:.1f} s behind a stalled store call"


def test_redis_down_serves_reads_refuses_writes_with_503_and_says_degraded(published, tmp_path):
    pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")
    with redis_server() as url:
        service = replica(published, tmp_path, RedisStore(url, namespace="synthetic", socket_timeout_s=0.5))
        client = TestClient(create_app(service, start=False), raise_server_exceptions=False)
        with id_key():
            served = client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 3}).json()
            assert served["recorded"] is True
    with id_key():  # the server is gone
        began = time.monotonic()
        read = client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 3})
        write = client.post("/v1/events", json={"events": [event_of(served)]})
        health = client.get("/healthz")
        took = time.monotonic() - began
    assert read.status_code == 200 and read.json()["recorded"] is False and len(read.json()["items"]) == 3
    assert write.status_code == 503 and write.headers["retry-after"] == "1", write.text
    assert set(write.json()) == {"error", "field"} and "unavailable" in write.json()["error"]
    body = health.json()
    assert health.status_code == 200 and body["status"] == "degraded" and body["store"] == "unreachable", body
    assert any("does not answer" in reason for reason in body["reasons"]), body
    assert took < 10, took


def test_a_sqlite_lock_held_elsewhere_costs_a_503_within_the_store_timeout(published, tmp_path):
    service = make_service(published, tmp_path)
    service.online.close()
    service.online = SQLiteStore(tmp_path / "locked.sqlite", namespace="synthetic", busy_timeout_s=0.3)
    service.flusher.store = service.online
    started(service)
    client = TestClient(create_app(service, start=False), raise_server_exceptions=False)
    with id_key():
        served = client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 3}).json()
    holder = sqlite3.connect(tmp_path / "locked.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    try:
        with id_key():
            began = time.monotonic()
            write = client.post("/v1/events", json={"events": [event_of(served)]})
            read = client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 3})
            took = time.monotonic() - began
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert write.status_code == 503 and read.status_code == 200 and read.json()["recorded"] is False
    assert took < 5, f"two requests took {took:.1f} s against a 0.3 s busy timeout"
    assert service.health()["status"] == "degraded"
    with id_key():
        again = client.post("/v1/events", json={"events": [event_of(served)]})
    assert again.status_code == 200 and again.json()["accepted"] == 1, again.text  # nothing half-written before


def test_a_failing_flush_turns_health_degraded_with_the_reason(published, tmp_path, monkeypatch):
    service = started(make_service(published, tmp_path))
    assert service.health()["status"] == "ok", service.health()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(service.flusher, "flush", full)
    with pytest.raises(OSError):
        service.flush()
    health = service.health()
    assert health["status"] == "degraded" and any("No space left" in r for r in health["reasons"]), health
    monkeypatch.undo()
    service.flush()
    assert service.health()["status"] == "ok"


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of ``megabytes`` at ``path`` (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full-disk test mounts a small tmpfs: it needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_keeps_reads_up_refuses_writes_with_503_and_loses_nothing(published, tmp_path):
    with small_disk(tmp_path / "disk", 4) as disk:
        service = make_service(published, tmp_path)
        service.online.close()
        service.online = SQLiteStore(disk / "online.sqlite", namespace="synthetic", busy_timeout_s=0.5)
        service.flusher.store = service.online
        started(service)
        client = TestClient(create_app(service, start=False), raise_server_exceptions=False)
        with id_key():
            before = client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 5}).json()
            assert client.post("/v1/events", json={"events": [event_of(before)]}).json()["accepted"] == 1
        filler = disk / "filler"
        with open(filler, "wb") as out, contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * (1 << 16))
        with id_key():
            reads = [client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 50}) for _ in range(40)]
            click = client.post("/v1/events", json={"events": [event_of(before, "click")]})
            health = client.get("/healthz").json()
        assert {r.status_code for r in reads} == {200}, {r.status_code for r in reads}
        assert any(r.json()["recorded"] is False for r in reads)
        assert click.status_code == 503, click.text
        assert health["status"] == "degraded", health
        filler.unlink()
        with id_key():
            again = client.post("/v1/events", json={"events": [event_of(before, "click")]})
        assert again.status_code == 200 and again.json()["accepted"] == 1, again.text
        pending = [row["event_id"] for _, row in service.online.pending_events(100)]
        assert sorted(pending) == sorted({f"{before['request_id']}:0:impression", f"{before['request_id']}:0:click"})
        service.online.close()


def test_events_recorded_before_a_failed_vector_update_are_acknowledged_not_503(published, tmp_path, monkeypatch):
    """The claim queued the events; the click's online-vector update then meets an outage: the
    answer is 200 with the events accepted (a 503 would make the client's retry a duplicate
    and lose them), and /healthz reports the failed call."""
    service = started(make_service(published, tmp_path))
    client = TestClient(create_app(service, start=False), raise_server_exceptions=False)
    with id_key():
        served = client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 3}).json()

    def down(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(SQLiteStore, "_update_user", down)
    with id_key():
        answer = client.post("/v1/events", json={"events": [event_of(served), event_of(served, "click")]})
    assert answer.status_code == 200 and answer.json()["accepted"] == 2, answer.text
    queued = sorted(row["event_id"] for _, row in service.online.pending_events(100))
    assert queued == sorted([f"{served['request_id']}:0:click", f"{served['request_id']}:0:impression"])
    assert service.health()["status"] == "degraded"
