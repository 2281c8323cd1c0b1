"""The API against hostile or clumsy callers (issue 28, classes 5, 7 and 9) over the session's
published synthetic snapshot:

* auth edges: a malformed ``Authorization`` header is a 401, never a 500; without a token the
  service served by ``python -m adrec_assets.serve`` answers only requests addressed to a
  loopback name (DNS rebinding); the optional read token closes the reads, and a response
  tells ``user_status`` only to an authenticated caller;
* one error shape: parser refusals, Starlette's own 404/405 and an unhandled exception all
  answer ``{"error", "field"}``, a 500 without a traceback;
* image decode bombs: an upload is refused on its header's pixel count before anything
  decodes it, and a refused upload leaves nothing behind.
"""

from __future__ import annotations

import base64
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adrec_assets.online.api import create_app
from adrec_assets.online.api.schemas import MAX_BODY_BYTES
from adrec_assets.online.config import ServingConfig
from adrec_assets.online.service import RecommendationService, _blob_name
from adrec_assets_tests.pipeline_fixtures import id_key
from adrec_assets_tests.test_service import KNOWN_USER, TOKEN, make_service, png_bytes

READ_TOKEN = "read-token-0123456789"
LOOPBACK = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def published(default_pipeline) -> Path:
    base, result, _ = default_pipeline
    assert result.success
    return base


@pytest.fixture
def client_of(published, tmp_path) -> Iterator:
    """``client_of(**config, loopback_only=False, base_url=LOOPBACK)``: a TestClient over a fresh service."""
    clients = []

    def make(*, loopback_only: bool = False, base_url: str = LOOPBACK, **config) -> TestClient:
        service = make_service(published, tmp_path / f"s{len(clients)}", **config)
        client = TestClient(create_app(service, loopback_only=loopback_only), base_url=base_url,
                            raise_server_exceptions=False)  # fmt: skip
        client.__enter__()
        client.service = service
        clients.append(client)
        return client

    with id_key():
        yield make
        for client in clients:
            client.__exit__(None, None, None)


def assert_error_shape(response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error", "field"} and isinstance(body["error"], str) and body["error"], body
    assert body["field"] == field, body
    return body


def impression(client: TestClient, headers: dict | None = None) -> dict:
    served = client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 2}, headers=headers or {}).json()
    return {"request_id": served["request_id"], "user_id": KNOWN_USER, "ad_id": served["items"][0]["ad_id"],
            "position": 0, "type": "impression", "timestamp": time.time()}  # fmt: skip


# ---------------------------------------------------------------- class 7: auth edges
@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer t\u00e9st".encode(),  # UTF-8 bytes: hmac.compare_digest refused the non-ASCII str (500)
        b"Bearer \xff\xfe",  # not even UTF-8
        ("Bearer \u00e9" + TOKEN[1:]).encode(),
        b"Bearer",
        b"Bearer ",
        b"Basic dXNlcjpwYXNz",
        b"Bearer " + TOKEN.encode() + b"x",
        b"Bearer " + TOKEN.encode()[:-1],
        b"Bearer  \t ",
        TOKEN.encode(),
    ],
)
def test_a_malformed_or_wrong_authorization_header_is_a_401_in_the_error_shape_never_a_500(client_of, authorization):
    client = client_of(api_token=TOKEN, read_token=READ_TOKEN)
    event = impression(client, {"Authorization": f"Bearer {READ_TOKEN}"})
    write = client.post("/v1/events", json={"events": [event]}, headers={"Authorization": authorization})
    assert_error_shape(write, 401, "authorization")
    assert write.headers["www-authenticate"] == "Bearer"
    read = client.get("/v1/recommendations", params={"user_id": "u", "k": 1}, headers={"Authorization": authorization})
    assert_error_shape(read, 401, "authorization")
    assert client.service.online.pending_events(10) == []


def test_the_bearer_scheme_is_case_insensitive_and_blanks_around_the_token_do_not_matter(client_of):
    client = client_of(api_token=TOKEN)
    for header in (f"bearer {TOKEN}", f"BEARER   {TOKEN}  "):
        response = client.post("/v1/events", json={"events": [impression(client)]}, headers={"Authorization": header})
        assert response.status_code == 200, response.text


def test_a_token_that_no_header_can_carry_is_refused_at_start_up(tmp_path):
    def config(**tokens) -> ServingConfig:
        return ServingConfig(source="synthetic", artifacts_root=tmp_path, sources_root=tmp_path, **tokens)

    for bad in ("t\u00e9st-token-0123456789", "token with blanks", "tab\ttoken", ""):
        for field in ("api_token", "read_token"):
            with pytest.raises(ValueError, match=field):
                config(**{"api_token": TOKEN, field: bad}).validate()
    with pytest.raises(ValueError, match="read_token"):  # reads closed while the writes are open: a mistake
        config(read_token=READ_TOKEN).validate()
    config(api_token=TOKEN, read_token=READ_TOKEN).validate()


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "localhost.:8000",
     "127.0.0.1:8000@evil.example", "[::1]x", "localhost:80:80", "localhost:\u00b2", "", "10.0.0.7:8000"],
)  # fmt: skip
def test_without_a_token_a_request_addressed_to_another_host_name_is_refused_421(client_of, host):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends
    ``Host: evil.example``; the browser lets it read the answers (same origin)."""
    client = client_of(loopback_only=True)
    event = impression(client)
    headers = {"Host": host.encode("latin-1")}  # as the bytes a client sends
    assert_error_shape(client.post("/v1/events", json={"events": [event]}, headers=headers), 421, "host")
    assert_error_shape(client.get("/v1/recommendations", params={"user_id": "u"}, headers=headers), 421, "host")
    assert_error_shape(client.get("/demo", headers=headers), 421, "host")
    assert client.service.online.pending_events(10) == []


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "LOCALHOST:8000", "127.0.0.1", "127.0.0.1:8000", "127.0.0.2", "[::1]",
             "[::1]:8000"],
)  # fmt: skip
def test_without_a_token_a_request_addressed_to_a_loopback_name_is_served(client_of, host):
    client = client_of(loopback_only=True)
    response = client.post("/v1/events", json={"events": [impression(client)]}, headers={"Host": host})
    assert response.status_code == 200, response.text


def test_the_serve_command_builds_a_loopback_only_app_without_a_token_and_an_open_one_with(published, tmp_path):
    from adrec_assets import serve
    from adrec_assets.online import service as service_module
    from adrec_assets.online.store import SQLiteStore

    calls = []
    original = service_module.pin_blas_to_one_thread
    service_module.pin_blas_to_one_thread = lambda: calls.append(1)  # not this test process's BLAS
    try:
        for token, status in ((None, 421), (TOKEN, 200)):
            config = ServingConfig(source="synthetic", artifacts_root=published, sources_root=tmp_path / "sources",
                                   load_encoder=False, api_token=token)  # fmt: skip
            with id_key():
                app = serve._app(config, SQLiteStore(tmp_path / f"online-{status}.sqlite", namespace="synthetic"))
                with TestClient(app, base_url="http://evil.example") as client:
                    assert client.get("/healthz").status_code == status
                with TestClient(app, base_url="http://localhost:8000") as client:
                    assert client.get("/healthz").status_code == 200
    finally:
        service_module.pin_blas_to_one_thread = original
    assert calls


def test_with_a_read_token_the_reads_need_a_read_or_the_write_token(client_of):
    client = client_of(api_token=TOKEN, read_token=READ_TOKEN)
    ad_id = client.service.state.catalog.ad_ids[0]
    reads = [("/v1/recommendations", {"user_id": KNOWN_USER, "k": 3}), (f"/v1/ads/{ad_id}", None)]
    with_image = next(i for i in range(len(client.service.state.catalog.ad_ids))
                      if client.service.state.catalog.image_paths[i])  # fmt: skip
    reads.append((f"/v1/ads/{client.service.state.catalog.ad_ids[with_image]}/image", None))
    for path, params in reads:
        assert_error_shape(client.get(path, params=params), 401, "authorization")
        for token in (READ_TOKEN, TOKEN):
            answer = client.get(path, params=params, headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, (path, answer.text)
    for path in ("/healthz", "/metrics", "/demo", "/openapi.json"):  # operations and the page itself stay open
        assert client.get(path).status_code == 200, path
    event = impression(client, {"Authorization": f"Bearer {READ_TOKEN}"})
    refused = client.post("/v1/events", json={"events": [event]}, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert_error_shape(refused, 401, "authorization")  # the read token does not write


def test_user_status_is_told_only_to_an_authenticated_caller(client_of):
    """Whether a raw id is in the training data, or clicked recently, is a membership oracle."""
    client = client_of(api_token=TOKEN)
    params = {"user_id": KNOWN_USER, "k": 3}
    anonymous = client.get("/v1/recommendations", params=params)
    assert anonymous.status_code == 200 and anonymous.json()["user_status"] is None, anonymous.text
    assert anonymous.json()["items"]  # the slate itself is still served
    trusted = client.get("/v1/recommendations", params=params, headers={"Authorization": f"Bearer {TOKEN}"})
    assert trusted.json()["user_status"] == "known"
    read = client_of(api_token=TOKEN, read_token=READ_TOKEN)
    answer = read.get("/v1/recommendations", params=params, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert answer.json()["user_status"] == "known"
    local = client_of(loopback_only=True)  # no token: loopback development mode, the caller is local
    assert local.get("/v1/recommendations", params=params).json()["user_status"] == "known"


def test_the_read_token_comes_from_the_environment(published, tmp_path, monkeypatch):
    monkeypatch.setenv("ADREC_API_TOKEN", TOKEN)
    monkeypatch.setenv("ADREC_READ_TOKEN", READ_TOKEN)
    monkeypatch.setenv("ADREC_SERVE_MAX_IMAGE_PIXELS", "1234")
    config = ServingConfig.from_env("synthetic")
    assert config.read_token == READ_TOKEN and config.max_image_pixels == 1234


def test_the_demo_page_sends_the_token_on_reads_too_and_loads_images_with_it(client_of):
    page = client_of().get("/demo").text
    assert 'if (state.token) headers["Authorization"]' in page
    assert "URL.createObjectURL" in page  # an <img src> cannot carry the header: fetched, shown as a blob


# ---------------------------------------------------------------- class 9: one error shape
def test_a_deeply_nested_body_is_refused_in_the_error_shape(client_of):
    client = client_of()
    response = client.post("/v1/events", content="[" * 100_000 + "]" * 100_000,
                           headers={"content-type": "application/json"})  # fmt: skip
    assert_error_shape(response, 422, "body")


def test_malformed_json_is_refused_in_the_error_shape(client_of):
    client = client_of()
    for body in ('{"events": [', "not json", '{"events": [}]}'):
        response = client.post("/v1/events", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422 and set(response.json()) == {"error", "field"}, response.text


def test_a_chunked_body_over_the_limit_is_a_413_in_the_error_shape(client_of):
    client = client_of()

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        yield b'{"events": ["'
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b"x" * (1 << 20)
        yield b'"]}'

    response = client.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
    assert_error_shape(response, 413)
    small = client.post(
        "/v1/events", content=iter([b'{"events": ', b"[]}"]), headers={"content-type": "application/json"}
    )
    assert_error_shape(small, 422, "events")  # a chunked body under the limit reaches the API as it was sent


def test_starlettes_own_404_and_405_answer_in_the_error_shape(client_of):
    client = client_of()
    assert_error_shape(client.get("/no/such/path"), 404)
    refused = client.delete("/v1/recommendations")
    assert_error_shape(refused, 405)
    assert refused.headers["allow"] == "GET"


def test_an_unhandled_exception_is_a_500_in_the_error_shape_without_a_traceback(client_of, monkeypatch):
    client = client_of()

    def broken(*_args, **_kwargs):
        raise RuntimeError("secret detail in /srv/adrec/internal.py")

    monkeypatch.setattr(client.service, "recommend", broken)
    response = client.get("/v1/recommendations", params={"user_id": "u", "k": 1})
    body = assert_error_shape(response, 500)
    assert "secret" not in response.text and "Traceback" not in response.text and "RuntimeError" not in body["error"]
    assert client.get("/healthz").status_code == 200  # and the service goes on


# ---------------------------------------------------------------- class 5: image decode bombs
def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit greyscale PNG of ``width x height`` black pixels: zero rows squeeze about
    1000:1, so a 20000 x 20000 image (400 megapixels) is a few hundred kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, rows = zlib.compressobj(9), bytes(1 + width) * 64  # each row: filter byte 0, then zeros
    idat = b"".join(compressor.compress(rows) for _ in range(height // 64))
    idat += compressor.compress(bytes(1 + width) * (height % 64)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def leftovers(service: RecommendationService, ad_id: str) -> list:
    """What a refused upload of ``ad_id`` could have left: temporary folders, the live ad, its blob."""
    temporary = Path(os.environ.get("TMPDIR", "/tmp"))
    return [*temporary.glob(f"adrec-new-ad-{os.getpid()}-*"), *service.online.live_ads(),
            *([ad_id] if service.online.get_arrays(f"image.{_blob_name(ad_id)}") is not None else [])]  # fmt: skip


@pytest.mark.parametrize("side", [12_000, 20_000])
def test_an_image_over_the_pixel_limit_is_refused_from_its_header_before_anything_decodes_it(client_of, side):
    """12000 x 12000 was accepted after seconds and ~1.1 GB; 20000 x 20000 answered 500. This
    service has no encoder, so an image that passed the check would answer 503: the 413 comes
    from the header alone."""
    client = client_of()
    bomb = png_bomb(side, side)
    assert len(bomb) < client.service.config.max_image_bytes
    started = time.monotonic()
    response = client.post("/v1/ads", json={"ad_id": f"ad-bomb-{side}", "text": "boom",
                                            "image_base64": base64.b64encode(bomb).decode()})  # fmt: skip
    body = assert_error_shape(response, 413, "image_base64")
    assert f"limit of {4096 * 4096} pixels" in body["error"], body
    assert side > 13_000 or f"{side} x {side}" in body["error"], body  # past Pillow's own limit the size goes unread
    assert time.monotonic() - started < 5
    assert leftovers(client.service, f"ad-bomb-{side}") == []


def test_the_pixel_limit_is_the_configured_one_and_an_image_within_it_passes_the_check(client_of):
    client = client_of(max_image_pixels=32 * 32)
    within = client.post("/v1/ads", json={"ad_id": "ad-ok", "text": "t",
                                          "image_base64": base64.b64encode(png_bytes()).decode()})  # fmt: skip
    assert within.status_code == 503, within.text  # 32 x 32 passed the check; no encoder here
    over = client.post("/v1/ads", json={"ad_id": "ad-big", "text": "t",
                                        "image_base64": base64.b64encode(png_bomb(33, 32)).decode()})  # fmt: skip
    assert_error_shape(over, 413, "image_base64")
    assert leftovers(client.service, "ad-big") == []


def test_an_encoder_never_sees_an_image_over_the_limit(client_of):
    """With an encoder loaded the refusal still comes first: the encoder is never called."""
    client = client_of()
    calls = []

    class Spy:
        def encode(self, *args, **kwargs):
            calls.append(args)
            raise AssertionError("the encoder was handed an image over the pixel limit")

    client.service._encoder = Spy()
    response = client.post("/v1/ads", json={"ad_id": "ad-bomb", "text": "boom",
                                            "image_base64": base64.b64encode(png_bomb(5000, 5000)).decode()})  # fmt: skip
    assert_error_shape(response, 413, "image_base64")
    assert calls == [] and leftovers(client.service, "ad-bomb") == []
