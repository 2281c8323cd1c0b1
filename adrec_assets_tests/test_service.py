"""The online service through its HTTP API (FastAPI's TestClient) over the session's published
synthetic snapshot: recommendations, online user updates, live ads, retirement, auth, bad
input, metrics, privacy. The hot reload and the closed loop are in ``test_service_loop.py``."""

from __future__ import annotations

import base64
import io
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from adrec_assets.online.api import create_app
from adrec_assets.online.config import ServingConfig
from adrec_assets.online.service import RecommendationService
from adrec_assets.online.store import SQLiteStore
from adrec_assets.privacy import pseudonymize
from adrec_assets.recommender import Recommender
from adrec_assets.snapshots import SnapshotStore
from adrec_assets_tests.pipeline_fixtures import TEST_ID_KEY, id_key

KNOWN_USER = "user-0000005"
TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def published(default_pipeline) -> Path:
    base, result, _ = default_pipeline
    assert result.success
    return base


def make_service(base: Path, tmp_path: Path, **config) -> RecommendationService:
    settings = {"source": "synthetic", "artifacts_root": base, "sources_root": tmp_path / "sources", "seed": 7,
                "load_encoder": False, **config}  # fmt: skip
    with id_key():
        return RecommendationService(
            ServingConfig(**settings), SQLiteStore(tmp_path / "online.sqlite", namespace="synthetic")
        )


@pytest.fixture
def api(published, tmp_path) -> Iterator[tuple[TestClient, RecommendationService]]:
    service = make_service(published, tmp_path)
    with id_key(), TestClient(create_app(service)) as client:
        yield client, service


def recommend(client: TestClient, user: str = KNOWN_USER, k: int = 10, **params) -> dict:
    response = client.get("/v1/recommendations", params={"user_id": user, "k": k, **params})
    assert response.status_code == 200, response.text
    return response.json()


def click(client: TestClient, served: dict, position: int, user: str = KNOWN_USER, **headers) -> dict:
    event = {"request_id": served["request_id"], "user_id": user, "ad_id": served["items"][position]["ad_id"],
             "position": position, "type": "click", "timestamp": time.time()}  # fmt: skip
    response = client.post("/v1/events", json={"events": [event]}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- recommendations


def test_a_known_user_gets_the_models_top_k_from_the_published_snapshot(api, published):
    client, _ = api
    body = recommend(client, k=7)
    reference = Recommender.load(published, "synthetic")
    pseudonym = pseudonymize(KNOWN_USER, TEST_ID_KEY.encode())
    expected = reference.recommend(pseudonym, k=7)
    assert body["model_version"] == SnapshotStore(published, "synthetic").current_id() == reference.version
    assert body["user_status"] == "known" and body["policy"] == "greedy"
    assert [i["ad_id"] for i in body["items"]] == [r.ad_id for r in expected]
    np.testing.assert_allclose([i["score"] for i in body["items"]], [r.score for r in expected], atol=1e-5)
    assert [i["position"] for i in body["items"]] == list(range(7)) and all(
        i["propensity"] == 1.0 for i in body["items"]
    )
    assert all(i["text"] for i in body["items"])


def test_a_new_user_is_served_from_the_global_mean(api, published):
    client, _ = api
    body = recommend(client, user="never-seen-before", k=5)
    reference = Recommender.load(published, "synthetic")
    assert body["user_status"] == "new"
    assert [i["ad_id"] for i in body["items"]] == [r.ad_id for r in reference.recommend(reference.prior.vector, k=5)]


def test_new_users_are_answered_from_the_exact_list_pinned_at_load_not_by_searching(api, published, monkeypatch):
    """Every new user shares the prior query: the index answers it from the exact list pinned
    when the snapshot loaded, with no index search (for HNSW: exact, where a search is not)."""
    client, service = api
    reference = Recommender.load(published, "synthetic")
    faiss_index = service.state.index._index

    class NoSearch:
        def __getattr__(self, name):
            if name == "search":
                raise AssertionError("the new user's query reached the faiss index")
            return getattr(faiss_index, name)

    monkeypatch.setattr(service.state.index, "_index", NoSearch())
    body = recommend(client, user="another-new-user", k=30)
    assert body["user_status"] == "new"
    assert [i["ad_id"] for i in body["items"]] == [r.ad_id for r in reference.recommend(reference.prior.vector, k=30)]
    with pytest.raises(AssertionError, match="reached the faiss index"):
        recommend(client, k=5)  # a known user: a real search


@pytest.fixture
def ema_api(published, tmp_path) -> Iterator[tuple[TestClient, RecommendationService]]:
    service = make_service(published, tmp_path, user_update="ema")
    with id_key(), TestClient(create_app(service)) as client:
        yield client, service


def test_a_click_moves_the_users_vector_and_the_next_response_reflects_it(ema_api, published):
    """ADREC_SERVE_USER_UPDATE=ema: the click-only EMA (the per-user posterior's own tests:
    test_user_posterior.py)."""
    client, service = ema_api
    target, scores = _a_click_at_13_moves_the_ad_up(client)
    # exactly the EMA: u <- normalize((1 - a) u + a p_ad), a = 0.3 at position 13 with no position bias known
    reference = Recommender.load(published, "synthetic")
    u = reference.user_vector(pseudonymize(KNOWN_USER, TEST_ID_KEY.encode()))[0].astype(np.float64)
    p = reference.ads.vectors[reference.ad_rows([target["ad_id"]])[0]].astype(np.float64)
    moved = 0.7 * u + 0.3 * p
    moved /= np.linalg.norm(moved)
    np.testing.assert_allclose(
        reference.score(moved.astype(np.float32), [target["ad_id"]])[0], scores[target["ad_id"]], atol=1e-5
    )


def test_events_are_checked_against_the_served_slate_and_a_bad_batch_changes_nothing(api):
    client, service = api
    served = recommend(client, k=5)
    good = {"request_id": served["request_id"], "user_id": KNOWN_USER, "ad_id": served["items"][1]["ad_id"],
            "position": 1, "type": "click", "timestamp": time.time()}  # fmt: skip
    bad_cases = {  # field -> (event, status): 404 for an unknown request, 409 for a mismatch with what was served
        "request_id": ({**good, "request_id": "0" * 32}, 404),
        "user_id": ({**good, "user_id": "someone-else"}, 409),
        "ad_id": ({**good, "ad_id": served["items"][2]["ad_id"]}, 409),
        "position": ({**good, "position": 7}, 409),
    }
    for field, (bad, status) in bad_cases.items():
        response = client.post("/v1/events", json={"events": [good, bad]})
        assert response.status_code == status and response.json()["field"] == f"events[1].{field}", response.text
    assert service.online.pending_events(10) == []  # the good event of each batch was not applied either
    assert recommend(client, k=5)["user_status"] == "known"
    assert client.post("/v1/events", json={"events": [good, good]}).json() == {
        "accepted": 1,
        "duplicates": 1,
        "clicks": 1,
    }
    assert client.post("/v1/events", json={"events": [good]}).json()["duplicates"] == 1  # idempotent across batches


# ---------------------------------------------------------------- live ads


@pytest.fixture
def api_with_encoder(published, tmp_path) -> Iterator[tuple[TestClient, RecommendationService]]:
    service = make_service(published, tmp_path, load_encoder=True)
    with id_key(), TestClient(create_app(service)) as client:
        deadline = time.monotonic() + 120
        while service._encoder is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service._encoder is not None, service._encoder_error
        yield client, service


def png_bytes(color=(200, 40, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_new_ad_is_encoded_projected_and_recommendable_in_the_next_request(api_with_encoder):
    client, service = api_with_encoder
    image = base64.b64encode(png_bytes()).decode()
    response = client.post(
        "/v1/ads", json={"ad_id": "ad-new-1", "text": "Lightweight trail running shoes", "image_base64": image}
    )
    assert response.status_code == 201, response.text
    state = service.state
    vector = state.index.vectors(np.asarray([state.index.slot_of("ad-new-1")]))[0]
    # a user pointing at the new ad gets it first: it is in the live index, scored like any ad
    service.online.update_user(
        state.space, pseudonymize("fan", TEST_ID_KEY.encode()), lambda _: vector[:-1] / np.linalg.norm(vector[:-1])
    )
    body = recommend(client, user="fan", k=3)
    assert body["items"][0]["ad_id"] == "ad-new-1" and body["items"][0]["live"] and body["items"][0]["has_image"]
    assert client.get("/v1/ads/ad-new-1").json() == {"ad_id": "ad-new-1", "text": "Lightweight trail running shoes",
                                                      "has_image": True, "live": True, "fields": {}}  # fmt: skip
    assert client.get("/v1/ads/ad-new-1/image").content == png_bytes()
    assert client.post("/v1/ads", json={"ad_id": "ad-new-1", "text": "again"}).status_code == 409
    existing = state.catalog.ad_ids[0]
    assert client.post("/v1/ads", json={"ad_id": existing, "text": "again"}).status_code == 409


@pytest.mark.parametrize(
    "image, field",
    [("not base64 at all!", "image_base64"), (base64.b64encode(b"\x89PNG but truncated").decode(), "image_base64")],
)
def test_a_corrupt_image_is_refused_and_adds_nothing(api_with_encoder, image, field):
    client, service = api_with_encoder
    before = len(service.state.index)
    response = client.post("/v1/ads", json={"ad_id": "ad-broken", "text": "x", "image_base64": image})
    assert response.status_code == 422 and response.json()["field"] == field, response.text
    assert len(service.state.index) == before and service.online.live_ads() == []


def test_without_an_encoder_new_ads_wait_with_503_and_say_why(api):
    client, _ = api
    response = client.post("/v1/ads", json={"ad_id": "ad-x", "text": "text"})
    assert response.status_code == 503 and "encoder" in response.json()["error"]


def test_a_retired_ad_is_never_served_again_also_after_a_restart(published, tmp_path):
    service = make_service(published, tmp_path)
    with id_key(), TestClient(create_app(service)) as client:
        top = recommend(client, k=3)["items"][0]["ad_id"]
        assert client.delete(f"/v1/ads/{top}").json()["retired"] is True
        assert client.delete(f"/v1/ads/{top}").status_code == 409
        assert client.delete("/v1/ads/no-such-ad").status_code == 404
        for _ in range(30):  # the random policy visits the whole catalogue
            assert top not in [i["ad_id"] for i in recommend(client, k=50, policy="random")["items"]]
    restarted = make_service(published, tmp_path)  # same store: a restart (or another replica)
    with id_key(), TestClient(create_app(restarted)) as client:
        assert top not in [i["ad_id"] for i in recommend(client, k=220)["items"]]


def test_thompson_learns_a_live_ads_own_effect_from_its_skips_keeps_it_over_a_restart_and_forgets_it_when_retired(
    published, tmp_path
):
    """A live ad gets a random effect (prior sd 2): Thompson explores it, its skipped
    impressions lower its mean and shrink its uncertainty, a restart on the same store
    starts from what was learnt, retirement removes it."""
    service = make_service(published, tmp_path, default_policy="thompson", fresh_prior_sd=2.0, settle_seconds=0.0)
    with id_key():
        service.start(background=False)
        state = service.state
        content = service.snapshots.load("ad_embeddings_raw", state.snapshot).vectors[0]
        service.add_ad("ad-live-fresh", "A brand-new ad", None, content=content)
        assert state.fresh.view().ad_ids.tolist() == ["ad-live-fresh"]
        events = []
        for number in range(400):
            user = f"user-{number % 40:07d}"
            served = service.recommend(user, 5)
            events += [{"request_id": served["request_id"], "user_id": user, "ad_id": item["ad_id"],
                        "position": item["position"], "type": "impression", "timestamp": time.time()}
                       for item in served["items"]]  # fmt: skip
        shown = sum(event["ad_id"] == "ad-live-fresh" for event in events)
        assert shown >= 5
        service.record_events(events)
        service.settle(now=time.time() + 1)
        view = state.fresh.view()
        assert view.mean[0] < 0 and view.precision[0] > 1 / 2.0**2
        restarted = make_service(published, tmp_path, default_policy="thompson", fresh_prior_sd=2.0)  # same store
        restarted.start(background=False)
        again = restarted.state.fresh.view()  # a restart (or another replica) starts from what was learnt
        assert again.ad_ids.tolist() == ["ad-live-fresh"]
        np.testing.assert_allclose([again.mean[0], again.precision[0]], [view.mean[0], view.precision[0]])
        service.retire_ad("ad-live-fresh")
        assert state.fresh.view().count == 0


def _serve_and_settle(service: RecommendationService, requests: int) -> None:
    events = []
    for number in range(requests):
        user = f"user-{number % 40:07d}"
        served = service.recommend(user, 5)
        events += [{"request_id": served["request_id"], "user_id": user, "ad_id": item["ad_id"],
                    "position": item["position"], "type": "impression", "timestamp": time.time()}
                   for item in served["items"]]  # fmt: skip
    service.record_events(events)
    service.settle(now=time.time() + 1)


def test_two_replicas_pool_what_each_learns_about_a_live_ad_through_the_store(published, tmp_path, monkeypatch):
    """Each replica learns from its own traffic and adds only that to the shared value, so
    the second to settle ends with both replicas' learning and the first takes it up on its
    next flush (a last-write-wins blob would keep one replica's)."""
    # two seeds: replicas never hand out the same request id (one seed would, and the store
    # would rightly take the second replica's events for duplicates of the first's)
    first, second = (make_service(published, tmp_path, default_policy="thompson", fresh_prior_sd=2.0, settle_seconds=0.0,
                                  seed=seed) for seed in (7, 8))  # fmt: skip
    with id_key():
        first.start(background=False)
        second.start(background=False)
        content = first.snapshots.load("ad_embeddings_raw", first.state.snapshot).vectors[0]
        first.add_ad("ad-live-shared", "A brand-new ad", None, content=content)
        assert second.sync_live_ads() == 1 and second.state.fresh.view().ad_ids.tolist() == ["ad-live-shared"]
        prior = second.state.fresh.view().precision[0]
        _serve_and_settle(first, 300)
        first_alone = first.state.fresh.view().precision[0]
        before_merge = []
        real_sync = second.state.fresh.sync
        monkeypatch.setattr(
            second.state.fresh,
            "sync",
            lambda store, name: (before_merge.append(second.state.fresh.view().precision[0]), real_sync(store, name))[
                1
            ],
        )
        _serve_and_settle(second, 300)
        second_alone = before_merge[0]
        assert first_alone > prior and second_alone > prior
        pooled = second.state.fresh.view()
        np.testing.assert_allclose(pooled.precision[0], first_alone + second_alone - prior, rtol=1e-9)
        first.flush()
        np.testing.assert_allclose(first.state.fresh.view().precision[0], pooled.precision[0], rtol=1e-12)
        np.testing.assert_allclose(first.state.fresh.view().mean[0], pooled.mean[0], rtol=1e-12)


def test_the_untrained_scope_gives_every_click_less_catalogue_ad_an_effect(published, tmp_path):
    service = make_service(published, tmp_path, fresh_scope="untrained")
    with id_key():
        service.start(background=False)
        graph = service.snapshots.load("click_graph", service.state.snapshot)
    clicks = np.bincount(graph.indices, minlength=len(graph.ad_ids))
    clicked = set(graph.ad_ids[clicks > 0].tolist())
    expected = sorted(ad for ad in service.state.catalog.ad_ids.tolist() if ad not in clicked)
    assert sorted(service.state.fresh.view().ad_ids.tolist()) == expected


@pytest.mark.parametrize(
    "setting, match", [({"fresh_scope": "all"}, "fresh_scope"), ({"fresh_prior_sd": -1.0}, "fresh_prior_sd")]
)
def test_fresh_ad_settings_out_of_range_are_refused_by_name(published, tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        ServingConfig(source="synthetic", artifacts_root=published, sources_root=tmp_path, **setting).validate()


# ---------------------------------------------------------------- bad input, auth, operations


@pytest.mark.parametrize(
    "call, status",
    [
        (lambda c: c.get("/v1/recommendations", params={"user_id": "u", "k": 0}), 422),
        (lambda c: c.get("/v1/recommendations", params={"user_id": "u", "k": 1001}), 422),
        (lambda c: c.get("/v1/recommendations", params={"user_id": "u", "k": "ten"}), 422),
        (lambda c: c.get("/v1/recommendations", params={"user_id": "x" * 257}), 422),
        (lambda c: c.get("/v1/recommendations", params={"k": 3}), 422),
        (lambda c: c.get("/v1/recommendations", params={"user_id": "u", "policy": "best"}), 422),
        (lambda c: c.post("/v1/events", content=b"{not json", headers={"content-type": "application/json"}), 422),
        (lambda c: c.post("/v1/events", json={"events": []}), 422),
        (lambda c: c.post("/v1/events", json={"events": [{"request_id": "r", "type": "view"}]}), 422),
        (lambda c: c.post("/v1/events", json={"events": "all"}), 422),
        (lambda c: c.post("/v1/ads", json={"ad_id": "a" * 300, "text": "t"}), 422),
        (lambda c: c.post("/v1/ads", content=b"x" * (9 * 1024 * 1024)), 413),
        (lambda c: c.get("/v1/ads/no-such-ad"), 404),
        (lambda c: c.get("/v1/ads/no-such-ad/image"), 404),
    ],
)
def test_bad_requests_get_a_clear_4xx_never_a_500(api, call, status):
    client, service = api
    before = (len(service.state.index), service.online.pending_events(10), service.online.live_ads())
    response = call(client)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert (len(service.state.index), service.online.pending_events(10), service.online.live_ads()) == before


def test_write_endpoints_need_the_bearer_token_when_one_is_set(published, tmp_path):
    service = make_service(published, tmp_path, api_token=TOKEN)
    with id_key(), TestClient(create_app(service)) as client:
        served = recommend(client, k=3)  # reads need no token
        event = {"request_id": served["request_id"], "user_id": KNOWN_USER, "ad_id": served["items"][0]["ad_id"],
                 "position": 0, "type": "impression", "timestamp": time.time()}  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = client.post("/v1/events", json={"events": [event]}, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert client.delete(f"/v1/ads/{served['items'][0]['ad_id']}").status_code == 401
        ok = client.post("/v1/events", json={"events": [event]}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200


def test_health_and_prometheus_metrics(api):
    client, service = api
    recommend(client)
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model_version"] == service.state.version and health["n_ads"] == 220
    text = client.get("/metrics").text
    assert 'adrec_requests_total{endpoint="/v1/recommendations",method="GET",status="200"} 1.0' in text
    assert f'adrec_model_info{{model_version="{service.state.version}"}} 1.0' in text
    assert "adrec_index_ads 220.0" in text
    assert 'adrec_request_seconds_bucket{endpoint="/v1/recommendations",le="0.005"}' in text
    # Refusals are counted under their route template and status, unknown paths as "unmatched".
    assert client.get("/v1/recommendations", params={"user_id": "u", "k": 0}).status_code == 422
    assert client.get("/v1/ads/no-such-ad").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    text = client.get("/metrics").text
    assert 'adrec_requests_total{endpoint="/v1/recommendations",method="GET",status="422"} 1.0' in text
    assert 'adrec_requests_total{endpoint="/v1/ads/{ad_id}",method="GET",status="404"} 1.0' in text
    assert 'adrec_requests_total{endpoint="unmatched",method="GET",status="404"} 1.0' in text


def test_after_a_reload_the_metrics_read_1_for_the_served_model_version_and_0_for_the_replaced_one():
    """Set to 0, not removed: in multiprocess mode a removed series would keep its last value
    in the worker's file."""
    from adrec_assets.online.api.metrics import Metrics

    serving = {"now": ("s-old", 10, 0)}
    metrics = Metrics(lambda: serving["now"])
    metrics.refresh()
    serving["now"] = ("s-new", 12, 1)
    metrics.refresh()
    text = metrics.exposition().decode()
    assert (
        'adrec_model_info{model_version="s-old"} 0.0' in text and 'adrec_model_info{model_version="s-new"} 1.0' in text
    )
    assert "adrec_index_ads 12.0" in text and "adrec_reloads 1.0" in text


def test_nothing_the_service_writes_holds_a_raw_user_id(api, tmp_path, caplog):
    client, service = api
    caplog.set_level(logging.DEBUG)
    raw = "alice@example.com"
    served = recommend(client, user=raw, k=5)
    click(client, served, 0, user=raw)
    client.get("/v1/recommendations", params={"user_id": raw, "k": 0})  # an error path too
    assert service.flush() == 1
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in written) and any(p.name.startswith("online.sqlite") for p in written)
    for path in written:
        assert raw.encode() not in path.read_bytes(), path
    assert raw not in caplog.text and raw not in client.get("/metrics").text
    assert (
        pseudonymize(raw, TEST_ID_KEY.encode()).encode()
        in next(p for p in written if p.suffix == ".parquet").read_bytes()
    )


def test_the_openapi_document_describes_every_endpoint(api):
    client, _ = api
    spec = client.get("/openapi.json").json()
    assert {"/v1/recommendations", "/v1/events", "/v1/ads", "/v1/ads/{ad_id}", "/v1/ads/{ad_id}/image", "/healthz",
            "/metrics"} <= set(spec["paths"])  # fmt: skip
    assert "422" in spec["paths"]["/v1/events"]["post"]["responses"]


# ---------------------------------------------------------------- the process: python -m adrec_assets.serve


def test_the_serve_command_answers_on_loopback(published, tmp_path):
    """What ``make serve`` runs: uvicorn on 127.0.0.1 over the published snapshot."""
    import json
    import subprocess
    import sys
    import urllib.request

    from adrec_assets_tests.service_helpers import free_port, pipeline_env, stop_process_group, wait_for_http

    port = free_port()
    env = pipeline_env(tmp_path / "home", published, tmp_path / "sources", ADREC_ID_KEY=TEST_ID_KEY,
                       ADREC_ONLINE_STORE=str(tmp_path / "online.sqlite"))  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adrec_assets.serve", "--source", "synthetic", "--port", str(port), "--no-encoder"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc, log, timeout=120)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/recommendations?user_id={KNOWN_USER}&k=3") as reply:
            body = json.loads(reply.read())
        assert body["user_status"] == "known" and len(body["items"]) == 3
    finally:
        stop_process_group(proc)
    assert KNOWN_USER not in log.read_text()  # the access log holds no query string


def test_serve_with_two_workers_keeps_them_consistent_through_the_shared_store(published, tmp_path):
    """``--workers 2``: two worker processes under uvicorn's supervisor on one port, each with
    its own service over the shared online store; a retirement is honoured by the answers that
    follow, and every scrape of ``/metrics``, whichever worker answers it, counts the requests
    of both. (Which worker takes a connection is the kernel's choice, so the cross-replica sync
    itself is tested with two services over one store in ``test_service_loop.py``.)"""
    import json
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path as FsPath

    from adrec_assets_tests.service_helpers import free_port, pipeline_env, stop_process_group, wait_for_http

    port = free_port()
    env = pipeline_env(tmp_path / "home", published, tmp_path / "sources", ADREC_ID_KEY=TEST_ID_KEY,
                       ADREC_ONLINE_STORE=str(tmp_path / "online.sqlite"), ADREC_SERVE_RELOAD_SECONDS="0.5")  # fmt: skip
    env.pop("ADREC_API_TOKEN", None)  # loopback: write endpoints without a token
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adrec_assets.serve", "--source", "synthetic", "--port", str(port), "--no-encoder",
             "--workers", "2"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    answered = 0

    def slate() -> list[str]:  # a fresh connection each time, so both workers answer some
        nonlocal answered
        with urllib.request.urlopen(f"{base}/v1/recommendations?user_id={KNOWN_USER}&k=220", timeout=30) as reply:
            items = [item["ad_id"] for item in json.loads(reply.read())["items"]]
        answered += 1
        return items

    def scrape() -> tuple[float, set[str]]:
        """Recommendations answered with 200, and the pids with an index-size gauge."""
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as reply:
            text = reply.read().decode()
        served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("adrec_requests_total{") and 'endpoint="/v1/recommendations"' in line
                     and 'status="200"' in line)  # fmt: skip
        pids = set(re.findall(r'^adrec_index_ads\{pid="(\d+)"\}', text, flags=re.MULTILINE))
        return served, pids

    try:
        wait_for_http(f"{base}/healthz", proc, log, timeout=180)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both workers up: a run of answers without a refusal
            try:
                answers = [slate() for _ in range(20)]
                break
            except OSError:
                time.sleep(0.5)
        workers = [p for p in FsPath("/proc").glob("[0-9]*/stat")
                   if p.read_text().rsplit(")", 1)[1].split()[2] == str(proc.pid) and p.parent.name != str(proc.pid)]  # fmt: skip
        assert len(workers) >= 2, f"expected 2 worker processes in the server's group:\n{log.read_text()[-3000:]}"
        retired = answers[0][0]
        request = urllib.request.Request(f"{base}/v1/ads/{retired}", method="DELETE")
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
        deadline, clean_in_a_row = time.monotonic() + 30, 0
        while clean_in_a_row < 20 and time.monotonic() < deadline:
            clean_in_a_row = clean_in_a_row + 1 if retired not in slate() else 0
        assert clean_in_a_row == 20, f"the retired ad {retired!r} is still served"
        for _ in range(6):
            served, pids = scrape()
            assert served == answered and len(pids) == 2, (served, answered, pids)
    finally:
        stop_process_group(proc)


def test_the_serve_command_refuses_a_public_address_without_a_token(published, tmp_path):
    import subprocess
    import sys

    from adrec_assets_tests.service_helpers import pipeline_env

    env = pipeline_env(tmp_path / "home", published, tmp_path / "sources")
    env.pop("ADREC_API_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "adrec_assets.serve", "--source", "synthetic", "--host", "0.0.0.0", "--port", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "refusing to listen on 0.0.0.0 without ADREC_API_TOKEN" in done.stderr


def test_an_experiment_arm_sets_the_policy_and_every_event_records_the_arm(published, tmp_path):
    toml = tmp_path / "experiments.toml"
    toml.write_text(
        '[[experiment]]\nname = "explore"\nsalt = "s1"\nstart = 2020-01-01T00:00:00Z\n'
        '  [[experiment.arm]]\n  name = "thompson-arm"\n  share = 1.0\n  policy = "thompson"\n'
    )
    service = make_service(published, tmp_path, experiments_path=toml)
    with id_key(), TestClient(create_app(service)) as client:
        served = recommend(client, k=5)
        assert served["policy"] == "thompson" and served["experiments"] == [
            {"experiment": "explore", "arm": "thompson-arm"}
        ]
        assert recommend(client, k=5, policy="greedy")["policy"] == "greedy"  # the request's own choice wins
        click(client, served, 1)
        (row,) = [r for _, r in service.online.pending_events(10)]
        assert row["experiments"] == "explore=thompson-arm" and row["policy"] == "thompson"
        assert 0 < row["propensity"] <= 1


# ---------------------------------------------------------------- per-user posterior
def _record(service: RecommendationService, user: str) -> np.ndarray | None:
    return service.online.get_user(service.state.space, service._pseudonym(user))


def _a_click_at_13_moves_the_ad_up(client: TestClient) -> tuple[dict, dict[str, float]]:
    """Click the 13th of 20 ads; the next answer scores it higher. Returns it and those scores."""
    before = recommend(client, k=20)
    target = before["items"][12]
    assert click(client, before, 12) == {"accepted": 1, "duplicates": 0, "clicks": 1}
    after = recommend(client, k=20)
    assert after["user_status"] == "updated_online"
    scores = {i["ad_id"]: i["score"] for i in after["items"]}
    assert target["ad_id"] in scores and scores[target["ad_id"]] > target["score"]  # it moved up
    return target, scores


def test_a_click_teaches_the_users_posterior_and_the_ad_moves_up(api):
    client, service = api
    _a_click_at_13_moves_the_ad_up(client)
    record = _record(service, KNOWN_USER)
    assert record is not None and 4 * len(record) <= 4096  # the budget per user


def test_a_skip_moves_the_users_posterior_mean_away_from_the_skipped_ads(published, tmp_path):
    """Impressions without a click teach the user's own posterior once they settle: the mean
    moves away from every skipped ad, and the next slate scores them lower without any click."""
    service = make_service(published, tmp_path, settle_seconds=0.0)
    with id_key(), TestClient(create_app(service)) as client:
        served = recommend(client, k=5)
        assert _record(service, KNOWN_USER) is None
        events = [{"request_id": served["request_id"], "user_id": KNOWN_USER, "ad_id": item["ad_id"],
                   "position": item["position"], "type": "impression", "timestamp": time.time()}
                  for item in served["items"]]  # fmt: skip
        assert client.post("/v1/events", json={"events": events}).status_code == 200
        assert _record(service, KNOWN_USER) is None  # skips wait to settle (their click may still come)
        assert service.settle(now=time.time() + 1) == 5
        record = _record(service, KNOWN_USER)
        assert record is not None
        again = recommend(client, k=5)
        assert again["user_status"] == "updated_online"
        before = {i["ad_id"]: i["score"] for i in served["items"]}
        state = service.state
        slots = np.asarray([state.index.slot_of(a) for a in before], dtype=np.int64)
        rows = state.index.vectors(slots)
        served_vector = state.user_vector(service._pseudonym(KNOWN_USER), None)[0]
        old = rows[:, :-1] @ served_vector + rows[:, -1]
        new = rows[:, :-1] @ record[: len(served_vector)] + rows[:, -1]
        assert np.all(new < old)  # every skipped ad now scores lower for this user
        served_again = {i["ad_id"]: i["score"] for i in again["items"] if i["ad_id"] in before}
        assert served_again and all(served_again[a] < before[a] for a in served_again)  # and the service says so


def test_a_store_outage_while_skips_settle_costs_one_write_not_one_per_user(published, tmp_path, monkeypatch):
    """Fault injection: the store stops answering as settled skips are written to users'
    posteriors. The first unavailable write ends the loop (a stalled store would otherwise
    cost one timeout per user and hold the flush that long); the batch still settles."""
    from adrec_assets.online.store import StoreUnavailableError

    service = make_service(published, tmp_path, settle_seconds=0.0)
    with id_key(), TestClient(create_app(service)) as client:
        for user in (KNOWN_USER, "someone-new-1", "someone-new-2"):
            served = client.get("/v1/recommendations", params={"user_id": user, "k": 3}).json()
            events = [{"request_id": served["request_id"], "user_id": user, "ad_id": item["ad_id"],
                       "position": item["position"], "type": "impression", "timestamp": time.time()}
                      for item in served["items"]]  # fmt: skip
            assert client.post("/v1/events", json={"events": events}).status_code == 200
        writes = []

        def unavailable(space, pseudonym, update):
            writes.append(pseudonym)
            raise StoreUnavailableError("injected: the store stopped answering")

        monkeypatch.setattr(service.online, "update_user", unavailable)
        assert service.settle(now=time.time() + 1) == 9  # every impression settled (the shared model learnt them)
        assert len(writes) == 1, writes
