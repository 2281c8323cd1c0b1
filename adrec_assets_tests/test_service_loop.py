"""The service across re-materializations: hot reload without a failed request, the closed
loop (served clicks -> files -> sensor -> run -> a trained vector for the clicking user), and
replicas sharing one Redis store. A toy file source keeps every pipeline run short."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from adrec_assets.online.api import create_app
from adrec_assets.online.config import ServingConfig
from adrec_assets.online.events import read_event_log
from adrec_assets.online.service import RecommendationService
from adrec_assets.online.store import RedisStore, SQLiteStore
from adrec_assets.privacy import pseudonymize
from adrec_assets.recommender import Recommender
from adrec_assets.snapshots import SnapshotStore
from adrec_assets_tests.pipeline_fixtures import TEST_ID_KEY, id_key, materialize_pipeline
from adrec_assets_tests.redis_server import redis_server
from adrec_assets_tests.test_automation import tick
from adrec_assets_tests.test_file_sources import write_valid_source

SOURCE = "shop"


@pytest.fixture
def shop(tmp_path, encoder):
    """A toy source with one published snapshot, and a function that re-materializes it."""
    root, base = tmp_path / "sources", tmp_path / "artifacts"
    write_valid_source(root, SOURCE)
    instance = dg.instance_for_test()
    test_instance = instance.__enter__()

    def run(partition: str = SOURCE) -> dg.ExecuteInJobResult:
        result = materialize_pipeline(test_instance, base, partition=partition, root=str(root))
        assert result.success
        return result

    run()
    yield root, base, run, test_instance
    instance.__exit__(None, None, None)


def service_for(root: Path, base: Path, store, **config) -> RecommendationService:
    settings = {"source": SOURCE, "artifacts_root": base, "sources_root": root, "load_encoder": False,
                "reload_seconds": 0.1, "flush_seconds": 3600, **config}  # fmt: skip
    with id_key():
        return RecommendationService(ServingConfig(**settings), store)


def test_requests_across_a_rematerialization_never_fail_and_each_names_one_version(shop, tmp_path):
    root, base, run, _ = shop
    old = SnapshotStore(base, SOURCE).current_id()
    service = service_for(root, base, SQLiteStore(tmp_path / "online.sqlite", namespace=SOURCE))
    answers: list[tuple[str, int, dict]] = []
    stop = threading.Event()
    with id_key(), TestClient(create_app(service)) as client:

        def hammer() -> None:
            n = 0
            while not stop.is_set():
                user = f"user-{n % 9:02d}"
                response = client.get("/v1/recommendations", params={"user_id": user, "k": 6})
                answers.append((user, response.status_code, response.json()))
                n += 1

        worker = threading.Thread(target=hammer)
        worker.start()
        (root / SOURCE / "clicks" / "part-001.csv").write_text(
            "user_id,ad_id\nuser-00,ad-5\nuser-01,ad-4\nuser-new,ad-0\n"
        )
        run()  # a new snapshot is published while requests keep coming
        new = SnapshotStore(base, SOURCE).current_id()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(a[2].get("model_version") == new for a in answers[-5:]):
            time.sleep(0.05)
        stop.set()
        worker.join()
    assert new != old and len(answers) > 20
    assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    versions = [body["model_version"] for _, _, body in answers]
    assert set(versions) == {old, new}
    assert set(versions[versions.index(new) :]) == {new}  # once swapped, never back
    # every answer is one version's answer: its ads and scores are what that snapshot computes
    store = SnapshotStore(base, SOURCE)
    reference = {}
    for version in (old, new):
        snapshot = store.snapshot(version)
        reference[version] = Recommender(
            store.load("served_users", snapshot), store.load("global_mean", snapshot),
            store.load("served_ads", snapshot), version,
        )  # fmt: skip
    for user, _, body in answers:
        expected = reference[body["model_version"]].recommend(pseudonymize(user, TEST_ID_KEY.encode()), k=6)
        assert [i["ad_id"] for i in body["items"]] == [r.ad_id for r in expected]
        np.testing.assert_allclose([i["score"] for i in body["items"]], [r.score for r in expected], atol=1e-5)


def test_served_clicks_flow_back_and_the_clicking_user_gets_a_trained_vector(shop, tmp_path):
    root, base, run, instance = shop
    service = service_for(root, base, SQLiteStore(tmp_path / "online.sqlite", namespace=SOURCE))
    newcomer = "a-brand-new-user"
    with id_key(), TestClient(create_app(service)) as client:
        served = client.get("/v1/recommendations", params={"user_id": newcomer, "k": 4}).json()
        assert served["user_status"] == "new"
        events = [
            {"request_id": served["request_id"], "user_id": newcomer, "ad_id": item["ad_id"], "position": item["position"],
             "type": kind, "timestamp": 1_800_000_000.0}
            for item in served["items"] for kind in ("impression", "click") if kind == "impression" or item["position"] < 2
        ]  # fmt: skip
        assert client.post("/v1/events", json={"events": events}).json() == {
            "accepted": 6,
            "duplicates": 0,
            "clicks": 2,
        }
        assert service.flush() == 6
    clicks = pq.read_table(next((root / SOURCE / "clicks").glob("served-*.parquet"))).to_pylist()
    pseudonym = pseudonymize(newcomer, TEST_ID_KEY.encode())
    assert [(c["user_pseudonym"], c["ad_id"]) for c in clicks] == [(pseudonym, i["ad_id"]) for i in served["items"][:2]]
    log = read_event_log(root / SOURCE).to_pylist()
    assert {e["type"] for e in log} == {"impression", "click"} and all(
        e["model_version"] == served["model_version"] for e in log
    )
    assert all(e["policy"] == "greedy" and e["propensity"] == 1.0 for e in log)
    # the sensor sees the new click file and asks for a run of this source; the run trains the newcomer
    request = tick(instance, root, None)
    assert [r.partition_key for r in request.run_requests] == [SOURCE]
    result = run(request.run_requests[0].partition_key)
    graph_meta = {
        e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()
    }
    assert graph_meta["click_graph"]["n_users_given_as_pseudonyms"].value == 1
    published = SnapshotStore(base, SOURCE)
    posterior = published.load("policy_posterior")  # rebuilt from the log: any replica serves the same one
    assert (posterior.n_impressions, posterior.n_clicks) == (4, 2) and posterior.space == published.load(
        "served_users"
    ).space
    assert published.load("position_bias").method.startswith("none")  # 2 clicks are too few to estimate theta
    users = published.load("user_embeddings")
    row = users.row_of(pseudonym)
    assert row is not None and not users.isolated[row]  # a trained vector, learnt from the served clicks
    with id_key():
        assert service.reload_if_changed()
        again = service.recommend(newcomer, 3)
    assert again["user_status"] == "known" and again["model_version"] == SnapshotStore(base, SOURCE).current_id()


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


def test_replicas_sharing_redis_see_each_others_clicks_and_retirements(shop, redis_url):
    root, base, _, _ = shop
    a, b = (service_for(root, base, RedisStore(redis_url, namespace=SOURCE)) for _ in range(2))
    with id_key():
        a.start(background=False)
        b.start(background=False)
        served = a.recommend("shared-user", 5)
        a.record_events([{"request_id": served["request_id"], "user_id": "shared-user", "ad_id": served["items"][3]["ad_id"],
                          "position": 3, "type": "click", "timestamp": time.time()}])  # fmt: skip
        from_b = b.recommend("shared-user", 5)
        assert from_b["user_status"] == "updated_online"  # replica b reads the vector replica a moved
        vector = a.online.get_user(a.state.space, pseudonymize("shared-user", TEST_ID_KEY.encode()))
        assert vector is not None and from_b["items"] == b.recommend("shared-user", 5)["items"]
        retired = from_b["items"][0]["ad_id"]
        a.retire_ad(retired)
        assert b.sync_live_ads() == 1
        assert retired not in [i["ad_id"] for i in b.recommend("shared-user", 6)["items"]]


def test_an_experiment_arm_is_served_from_the_snapshot_it_names(shop, tmp_path):
    root, base, run, _ = shop
    pinned = SnapshotStore(base, SOURCE).current_id()
    (root / SOURCE / "clicks" / "part-001.csv").write_text("user_id,ad_id\nuser-00,ad-5\nuser-01,ad-4\n")
    run()
    current = SnapshotStore(base, SOURCE).current_id()
    toml = tmp_path / "experiments.toml"
    toml.write_text(
        '[[experiment]]\nname = "old-model"\nsalt = "s2"\nstart = 2020-01-01T00:00:00Z\n'
        f'  [[experiment.arm]]\n  name = "previous"\n  share = 1.0\n  model_version = "{pinned}"\n'
    )
    service = service_for(root, base, SQLiteStore(tmp_path / "online.sqlite", namespace=SOURCE), experiments_path=toml)
    with id_key():
        service.start(background=False)
        assert service.state.version == current != pinned
        assert service.recommend("user-00", 3)["model_version"] == pinned
