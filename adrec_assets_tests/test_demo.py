"""The demo page at the API level (FastAPI's TestClient over the session's published synthetic
snapshot): ``GET /demo`` is one self-contained page that calls only the public API, it stays
out of the OpenAPI document, and the flow it performs works through the API with the payloads
its JavaScript sends (their Python twins in ``adrec_assets.online.api.routers.demo``; the
browser test checks that the page's real requests equal them)."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adrec_assets.online.api import create_app
from adrec_assets.online.api.routers import demo
from adrec_assets.online.api.schemas import MAX_EVENTS_PER_BATCH
from adrec_assets.online.service import RecommendationService
from adrec_assets_tests.pipeline_fixtures import id_key
from adrec_assets_tests.test_service import KNOWN_USER, make_service, png_bytes


@pytest.fixture(scope="module")
def published(default_pipeline) -> Path:
    base, result, _ = default_pipeline
    assert result.success
    return base


@pytest.fixture
def api(published, tmp_path) -> Iterator[tuple[TestClient, RecommendationService]]:
    service = make_service(published, tmp_path, user_update="ema")  # as `make demo` serves the page
    with id_key(), TestClient(create_app(service)) as client:
        yield client, service


@pytest.fixture(scope="module")
def api_with_encoder(published, tmp_path_factory) -> Iterator[tuple[TestClient, RecommendationService]]:
    service = make_service(published, tmp_path_factory.mktemp("demo"), load_encoder=True)
    with id_key(), TestClient(create_app(service, start=False)) as client:
        service.start(background=False)
        service._load_encoder()  # synchronously: the test needs POST /v1/ads to encode, not to answer 503
        assert service._encoder is not None, service._encoder_error
        yield client, service


def recommend(client: TestClient, user: str, k: int, policy: str | None = None) -> dict:
    response = client.get("/v1/recommendations", params=demo.recommendation_params(user, k, policy))
    assert response.status_code == 200, response.text
    return response.json()


def post_click(client: TestClient, slate: dict, user: str, position: int, **options) -> dict:
    """What the page does when a card is clicked; returns the summed answers of its batches."""
    total = {"accepted": 0, "duplicates": 0, "clicks": 0}
    for batch in demo.slate_events(slate, user, position, time.time(), **options):
        response = client.post("/v1/events", json=batch)
        assert response.status_code == 200, response.text
        total = {key: total[key] + response.json()[key] for key in total}
    return total


def ids(slate: dict) -> list[str]:
    return [item["ad_id"] for item in slate["items"]]


# ---------------------------------------------------------------- the page


def test_the_page_is_one_self_contained_html_document_over_the_public_api(api):
    client, _ = api
    response = client.get("/demo")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    calls = ('"v1/recommendations?"', '"v1/events"', '"v1/ads"', '"v1/ads/" + encodeURIComponent(item.ad_id) + "/image"',
             '"healthz"')  # fmt: skip
    for call in calls:
        assert call in html, call
    assert len(calls) == len(demo.ENDPOINTS)
    for function in ("function recommendationQuery(", "function slateEvents(", "function newAdBody("):
        assert function in html  # the twins of demo.recommendation_params / slate_events / new_ad_body
    assert "Authorization" in html and "Bearer " in html  # the token field is used on writes
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.IGNORECASE)  # nothing from another origin
    assert set(re.findall(r"<(script|link|img)\b[^>]*\b(?:src|href)=\"([^\"]*)\"", html)) <= {("link", "data:,")}
    for user in demo.DEFAULT_USERS:
        assert user in html


def test_the_pages_own_script_and_style_are_the_only_ones_its_csp_allows(api):
    client, _ = api
    response = client.get("/demo")
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    scripts = re.findall(r"<script>(.*?)</script>", response.text, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", response.text, re.DOTALL)
    assert len(scripts) == len(styles) == 1

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert policy["script-src"] == digest(scripts[0]) and policy["style-src"] == digest(styles[0])
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"


def test_the_page_is_not_part_of_the_api_document(api):
    client, _ = api
    paths = client.get("/openapi.json").json()["paths"]
    assert "/demo" not in paths
    assert {"/v1/recommendations", "/v1/events", "/v1/ads", "/v1/ads/{ad_id}/image", "/healthz"} <= set(paths)


# ---------------------------------------------------------------- the payloads


def test_a_click_is_an_impression_for_every_shown_card_then_the_click():
    slate = {"request_id": "r" * 32, "items": [{"ad_id": f"ad-{p}", "position": p} for p in range(3)]}
    [batch] = demo.slate_events(slate, "u-1", 2, 1_700_000_000.5)
    assert batch == {"events": [
        {"request_id": "r" * 32, "user_id": "u-1", "ad_id": "ad-0", "position": 0, "type": "impression", "timestamp": 1_700_000_000.5},
        {"request_id": "r" * 32, "user_id": "u-1", "ad_id": "ad-1", "position": 1, "type": "impression", "timestamp": 1_700_000_000.5},
        {"request_id": "r" * 32, "user_id": "u-1", "ad_id": "ad-2", "position": 2, "type": "impression", "timestamp": 1_700_000_000.5},
        {"request_id": "r" * 32, "user_id": "u-1", "ad_id": "ad-2", "position": 2, "type": "click", "timestamp": 1_700_000_000.5},
    ]}  # fmt: skip
    largest = {"request_id": "r" * 32, "items": [{"ad_id": f"ad-{p}", "position": p} for p in range(1000)]}
    batches = demo.slate_events(largest, "u-1", 0, 1.0)
    assert [len(b["events"]) for b in batches] == [MAX_EVENTS_PER_BATCH, 1]  # 1000 impressions + the click
    with pytest.raises(ValueError, match="position 3 is not in the slate"):
        demo.slate_events(slate, "u-1", 3, 1.0)


def test_a_new_ad_body_carries_the_image_as_base64_only_when_there_is_one():
    assert demo.new_ad_body("  ad-x ", "Some copy ") == {"ad_id": "ad-x", "text": "Some copy "}
    assert demo.new_ad_body("ad-x", "t", b"\x89PNG") == {"ad_id": "ad-x", "text": "t", "image_base64": "iVBORw=="}
    assert demo.recommendation_params("u", 8) == {"user_id": "u", "k": "8"}
    assert demo.recommendation_params("u", 8, "thompson") == {"user_id": "u", "k": "8", "policy": "thompson"}


# ---------------------------------------------------------------- the flow the page performs


def test_clicking_a_card_updates_the_user_and_changes_the_list(api):
    """The page clicks the last card: a click moves the user 30% toward that ad, which on this
    snapshot changes the top 8 of every synthetic user (the first card's click may not)."""
    client, _ = api
    before = recommend(client, KNOWN_USER, demo.DEFAULT_K)
    assert before["user_status"] == "known" and len(before["items"]) == demo.DEFAULT_K
    last = demo.DEFAULT_K - 1
    assert post_click(client, before, KNOWN_USER, last) == {
        "accepted": demo.DEFAULT_K + 1,
        "duplicates": 0,
        "clicks": 1,
    }
    after = recommend(client, KNOWN_USER, demo.DEFAULT_K)
    assert after["user_status"] == "updated_online" and after["request_id"] != before["request_id"]
    assert ids(after) != ids(before)
    clicked = before["items"][last]
    scores = {item["ad_id"]: item["score"] for item in after["items"]}
    assert scores.get(clicked["ad_id"], float("-inf")) > clicked["score"]  # it moved up into (or within) the list


def test_events_split_into_batches_are_all_accepted_and_clicking_twice_counts_duplicates(api):
    client, _ = api
    slate = recommend(client, "demo-batches", 10)
    assert post_click(client, slate, "demo-batches", 4, max_batch=3) == {"accepted": 11, "duplicates": 0, "clicks": 1}
    # a second click on the same (stale) slate: its impressions are duplicates, the new click counts
    assert post_click(client, slate, "demo-batches", 6) == {"accepted": 1, "duplicates": 10, "clicks": 1}


def test_what_the_page_shows_for_refused_requests_is_the_apis_error_field(api):
    client, _ = api
    slate = recommend(client, KNOWN_USER, 3)
    [batch] = demo.slate_events(slate, "someone-else", 0, time.time())
    refused = client.post("/v1/events", json=batch)
    assert refused.status_code == 409 and "is not the user request" in refused.json()["error"]
    without_encoder = client.post("/v1/ads", json=demo.new_ad_body("ad-demo-x", "copy"))
    assert without_encoder.status_code == 503 and "encoder" in without_encoder.json()["error"]


def test_an_uploaded_ad_with_an_image_is_served_at_once_and_a_click_pulls_the_user_toward_it(api_with_encoder):
    """What the page's "Add an ad" form and a click on the new card do. A new user with k at
    least the number of ads gets every live ad, so the new one is in the list by construction."""
    client, service = api_with_encoder
    image = png_bytes((30, 160, 90))
    added = client.post(
        "/v1/ads", json=demo.new_ad_body("ad-demo-upload", "Handmade ceramic mugs, glazed in our studio.", image)
    )
    assert added.status_code == 201, added.text
    assert added.json()["ad_id"] == "ad-demo-upload" and added.json()["model_version"] == service.state.version
    n_ads = client.get("/healthz").json()["n_ads"]
    user = "demo-visitor-upload"
    slate = recommend(client, user, 1000)
    assert slate["user_status"] == "new" and len(slate["items"]) == n_ads
    [new] = [item for item in slate["items"] if item["ad_id"] == "ad-demo-upload"]
    assert new["live"] and new["has_image"] and new["text"] == "Handmade ceramic mugs, glazed in our studio."
    assert client.get("/v1/ads/ad-demo-upload/image").content == image  # what the card's <img> loads
    post_click(client, slate, user, new["position"])
    again = recommend(client, user, 1000)
    [moved] = [item for item in again["items"] if item["ad_id"] == "ad-demo-upload"]
    assert (
        again["user_status"] == "updated_online"
        and moved["score"] > new["score"]
        and moved["position"] <= new["position"]
    )
    duplicate = client.post("/v1/ads", json=demo.new_ad_body("ad-demo-upload", "again"))
    assert duplicate.status_code == 409 and "already exists" in duplicate.json()["error"]
