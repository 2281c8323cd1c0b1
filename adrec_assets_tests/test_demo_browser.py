"""The demo page end to end in a real browser: ``python -m adrec_assets.serve`` on 127.0.0.1
over the session's published synthetic snapshot, with its encoder loaded, and Debian's
Chromium driven headless by Playwright (never a downloaded browser).

A person's path: open ``/demo``, choose an example user, click an ad → the status says
"updated online" and the list changes; add an ad with a text and a PNG → it is in the list
with its image; click it → the user moves toward it. Every request the page sends is
recorded and compared with its Python twin in ``adrec_assets.online.api.routers.demo``.
Screenshots land in ``test-artifacts/demo/`` (printed by the tests).

How the new ad is made to appear without depending on the model's ranking: a new user asks
for 1,000 ads (the API's maximum, more than the catalogue holds), and the greedy policy
serves every live ad when k covers them all, so the new ad is in the list by construction.
The page scrolls it into view. A click on it then moves the user's vector toward it, which
raises its score (the user vector turns toward the ad's direction), and the tests check it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from adrec_assets.online.api.routers import demo
from adrec_assets_tests.pipeline_fixtures import TEST_ID_KEY
from adrec_assets_tests.service_helpers import (
    ARTIFACTS_ROOT,
    CHROMIUM_ARGS,
    chromium_executable,
    free_port,
    pipeline_env,
    stop_process_group,
    tail,
    wait_for_http,
)

pytestmark = pytest.mark.slow

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="playwright (PyPI, in the `dev` extra) is not installed: `make setup`"
)

SHOTS = ARTIFACTS_ROOT / "demo"
USER = demo.DEFAULT_USERS[0]
STEP_TIMEOUT_MS = 30_000  # one page step (a request and its rendering) on a busy 2-core machine
STARTUP_TIMEOUT_S = 180  # the service: snapshot, then the encoder (torch + two small models)
NEW_AD_ID = "ad-demo-mugs"
NEW_AD_TEXT = "Handmade ceramic mugs, glazed in our studio. Order a set of four for your morning coffee."


@dataclass
class DemoServer:
    url: str
    proc: subprocess.Popen
    log: Path
    console: list[str] = field(default_factory=list)


def health_of(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as reply:
        return json.loads(reply.read())


def wait_for_encoder(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> dict:
    """Poll ``/healthz`` until the encoder is ready (POST /v1/ads answers 503 before)."""
    deadline = time.monotonic() + timeout
    health: dict = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited with {proc.returncode}:\n{tail(log)}")
        health = health_of(url)
        if health["encoder"] == "ready":
            return health
        if health["encoder"] != "the encoder is loading":
            raise AssertionError(f"the service cannot encode new ads: {health['encoder']}")
        time.sleep(0.5)
    raise AssertionError(f"the encoder was not ready within {timeout:.0f} s ({health}):\n{tail(log)}")


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_executable()  # skips, saying how to get it, before any server starts


@pytest.fixture(scope="module")
def server(chromium, default_pipeline, tmp_path_factory) -> Iterator[DemoServer]:
    """What ``make demo`` runs, on a free loopback port, with a throw-away online store."""
    base, result, _ = default_pipeline
    assert result.success
    root = tmp_path_factory.mktemp("demo")
    env = pipeline_env(root / "home", base, root / "sources", ADREC_ID_KEY=TEST_ID_KEY,
                       ADREC_ONLINE_STORE=str(root / "online.sqlite"), ADREC_SERVE_USER_UPDATE="ema")  # fmt: skip
    env.pop("ADREC_API_TOKEN", None)
    env.pop("ADREC_EXPERIMENTS", None)
    port, log = free_port(), root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adrec_assets.serve", "--source", "synthetic", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", proc, log, timeout=STARTUP_TIMEOUT_S)
        wait_for_encoder(url, proc, log, timeout=STARTUP_TIMEOUT_S)
        yield DemoServer(url=url, proc=proc, log=log)
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def browser(chromium, server) -> Iterator[object]:
    with playwright_sync.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=STEP_TIMEOUT_MS * 4)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, server) -> Iterator[object]:
    """A fresh tab at a modest size (the README's screenshot comes from it); uncaught script
    errors and Content-Security-Policy refusals are collected in ``server.console``."""
    tab = browser.new_page(viewport={"width": 1280, "height": 800})
    tab.set_default_timeout(STEP_TIMEOUT_MS)
    server.console.clear()
    tab.on("pageerror", lambda error: server.console.append(f"uncaught: {error}"))
    tab.on(
        "console",
        lambda message: server.console.append(message.text) if "Content Security Policy" in message.text else None,
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        tab.goto(f"{server.url}/demo")
        playwright_sync.expect(tab.locator("#health")).to_contain_text("encoder ready")
        yield tab
    finally:
        tab.close()
    assert server.console == [], f"the page logged errors: {server.console}\n{tail(server.log)}"


def shot(page, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    """Save a screenshot once every image on the page has loaded, and say where."""
    page.wait_for_function("() => [...document.images].every(i => !i.src || (i.complete && i.naturalWidth > 0))")
    path = SHOTS / name
    page.screenshot(path=str(path))
    with capsys.disabled():
        print(f"\n  screenshot: {path}", end="")
    return path


def is_recommendations(exchange) -> bool:
    return urlsplit(exchange.url).path.endswith("/v1/recommendations")  # a request or its response


def is_post(suffix: str):
    return lambda request: request.method == "POST" and urlsplit(request.url).path.endswith(suffix)


def shown_ids(page) -> list[str]:
    return page.locator("#cards .card").evaluate_all("cards => cards.map(c => c.dataset.adId)")


def expect_cards(page, slate: dict) -> None:
    """Wait until the cards are exactly the slate's ads, in its order."""
    expected = [item["ad_id"] for item in slate["items"]]
    page.wait_for_function("ids => JSON.stringify([...document.querySelectorAll('#cards .card')].map(c => c.dataset.adId))"
                           " === JSON.stringify(ids)", arg=expected)  # fmt: skip


def click_card(page, slate: dict, user: str, ad_id: str) -> dict:
    """Click the card of ``ad_id`` as a person would; check the events the page posted equal
    their Python twin; return the slate the page asked for next."""
    position = next(item["position"] for item in slate["items"] if item["ad_id"] == ad_id)
    started = time.time()
    with page.expect_request(is_post("/v1/events")) as sent, page.expect_response(is_recommendations) as answer:
        page.locator(f"#cards .card[data-ad-id='{ad_id}']").click()
    body = sent.value.post_data_json
    timestamp = body["events"][0]["timestamp"]
    assert started - 1 <= timestamp <= time.time() + 1
    assert [body] == demo.slate_events(slate, user, position, timestamp)
    assert answer.value.ok, answer.value.text()
    return answer.value.json()


def mug_png() -> bytes:
    """A small picture for the new ad (64×64, drawn here, so the test needs no file)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (46, 125, 110))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((16, 18, 42, 50), radius=4, fill=(246, 240, 228))
    draw.arc((36, 24, 52, 42), start=270, end=90, fill=(246, 240, 228), width=4)
    draw.rectangle((16, 18, 42, 24), fill=(196, 92, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- the tests


def test_clicking_an_ad_changes_the_users_recommendations(server, page, capsys):
    """The last card is clicked: the user moves 30% toward that ad, which brings ads like it
    into the top 8 (clicking the first card can leave the list as it was)."""
    with page.expect_response(is_recommendations) as answer:
        page.get_by_role("button", name=USER, exact=True).click()
    query = parse_qs(urlsplit(answer.value.url).query)
    assert query == {key: [value] for key, value in demo.recommendation_params(USER, demo.DEFAULT_K).items()}
    before = answer.value.json()
    expect_cards(page, before)
    expect = playwright_sync.expect
    expect(page.locator("#user-status")).to_have_text("known")
    expect(page.locator("#slate-policy")).to_have_text("greedy")
    expect(page.locator("#slate-arms")).to_have_text("no experiment")
    expect(page.locator("#model-version")).to_have_text(before["model_version"])
    first = before["items"][0]
    card = page.locator(f"#cards .card[data-ad-id='{first['ad_id']}']")
    expect(card.locator(".text")).to_have_text(first["text"])
    expect(card.locator(".pos")).to_have_text("#1")
    assert page.locator("#cards .card img").count() == sum(item["has_image"] for item in before["items"]) > 0
    shot(page, "1_user.png", capsys)

    after = click_card(page, before, USER, before["items"][-1]["ad_id"])
    expect_cards(page, after)
    expect(page.locator("#user-status")).to_have_text("updated online")
    assert shown_ids(page) != [item["ad_id"] for item in before["items"]]
    expect(page.locator("#message")).to_contain_text("The list changed")
    assert page.locator("#cards .badge.entered, #cards .badge.up, #cards .badge.down").count() > 0
    assert page.locator("#error").is_hidden()
    shot(page, "2_after_click.png", capsys)


def test_an_uploaded_ad_appears_in_the_list_and_a_click_pulls_the_user_toward_it(server, page, capsys):
    expect = playwright_sync.expect
    user = "demo-visitor"
    n_ads = health_of(server.url)["n_ads"]  # the ads of the catalogue and those other tests added
    page.fill("#k", "1000")
    page.fill("#user-id", user)
    with page.expect_response(is_recommendations) as answer:
        page.get_by_role("button", name="Recommend").click()
    first = answer.value.json()
    assert first["user_status"] == "new" and len(first["items"]) == n_ads
    expect_cards(page, first)
    expect(page.locator("#user-status")).to_have_text("new")

    image = mug_png()
    page.fill("#ad-id", NEW_AD_ID)
    page.fill("#ad-text", NEW_AD_TEXT)
    page.set_input_files("#ad-image", {"name": "mugs.png", "mimeType": "image/png", "buffer": image})
    expect(page.locator("#ad-preview")).to_be_visible()
    with page.expect_request(is_post("/v1/ads")) as sent, page.expect_response(is_recommendations) as answer:
        page.get_by_role("button", name="Add ad").click()
    assert sent.value.post_data_json == demo.new_ad_body(NEW_AD_ID, NEW_AD_TEXT, image)
    with_new = answer.value.json()
    expect(page.locator("#ad-result")).to_contain_text(f"201 Created: {NEW_AD_ID}")
    expect(page.locator("#health")).to_contain_text(f"{n_ads + 1} ads in the index")
    assert len(with_new["items"]) == n_ads + 1
    expect_cards(page, with_new)
    card = page.locator(f"#cards .card[data-ad-id='{NEW_AD_ID}']")
    expect(card).to_be_visible()
    expect(card).to_be_in_viewport()  # the page scrolled to it
    expect(card).to_have_class("card just-added")
    expect(card.locator(".badge.live")).to_have_text("live ad")
    expect(card.locator(".text")).to_have_text(NEW_AD_TEXT)
    card.locator("img").evaluate("img => img.complete || new Promise(done => img.addEventListener('load', done))")
    assert card.locator("img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    shot(page, "3_new_ad.png", capsys)

    new = next(item for item in with_new["items"] if item["ad_id"] == NEW_AD_ID)
    after = click_card(page, with_new, user, NEW_AD_ID)
    expect_cards(page, after)
    expect(page.locator("#user-status")).to_have_text("updated online")
    moved = next(item for item in after["items"] if item["ad_id"] == NEW_AD_ID)
    assert moved["score"] > new["score"] and moved["position"] <= new["position"], (new, moved)
    expect(card).to_be_in_viewport()
    shot(page, "4_new_ad_clicked.png", capsys)


def test_refusals_are_shown_and_ids_are_text_not_markup(server, page, capsys):
    expect = playwright_sync.expect
    expect(page.locator("#slate-info")).to_be_hidden()  # nothing to describe before a user is chosen
    expect(page.locator("#ad-preview")).to_be_hidden()
    page.fill("#token", "demo-token")  # this service has none and ignores it; the page sends it on every call
    page.fill("#ad-id", f"{NEW_AD_ID}-twice")
    page.fill("#ad-text", "First time.")
    with page.expect_request(is_post("/v1/ads")) as sent:
        page.get_by_role("button", name="Add ad").click()
    assert sent.value.headers.get("authorization") == "Bearer demo-token"
    expect(page.locator("#ad-result")).to_contain_text("201 Created")
    page.get_by_role("button", name="Add ad").click()  # the same id again: 409 from the API
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("POST v1/ads \u2192 409: ")
    expect(page.locator("#error")).to_contain_text(f"'{NEW_AD_ID}-twice' already exists")
    page.fill("#ad-id", "ad-without-text")
    page.fill("#ad-text", "")
    page.get_by_role("button", name="Add ad").click()
    expect(page.locator("#error")).to_contain_text("POST v1/ads \u2192 422: text:")
    shot(page, "5_refused.png", capsys)

    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    page.fill("#user-id", hostile)
    with page.expect_request(is_recommendations) as asked:
        page.get_by_role("button", name="Recommend").click()
    assert asked.value.headers.get("authorization") == "Bearer demo-token"  # reads too (ADREC_READ_TOKEN)
    expect(page.locator("#slate-user")).to_have_text(hostile)
    expect(page.locator("#error")).to_be_hidden()
    assert page.locator("#slate-info img, #message img").count() == 0 and page.title() == "adrec demo"
