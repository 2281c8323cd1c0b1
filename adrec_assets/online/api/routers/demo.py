"""The demo page of the service: ``GET /demo``, one self-contained HTML page (inline CSS and
vanilla JavaScript, nothing fetched from another origin, so it works offline). Its markup,
style and script are the package's files ``api/static/demo.html``, ``demo.css`` and
``demo.js``, read once at import.

What a person does there: choose an example user or type any id (a new id is a new user,
served from the global-mean prior), see the recommended ads as cards (image, text, score,
position) with the user's status, the model version, the policy and the experiment arms
that served them; click a card and watch the list change as the user's online vector moves
toward the ad; upload a new ad (text and an optional image) and see it ranked right away.

**Why a page of the service and not Gradio.** Gradio would be a large extra dependency
(about 100 MB, and it pins ``fastapi<1.0`` and ``pillow<13``, so it would hold back the
service's own stack) for a page of a few hundred lines. More importantly, this page is only a
client of the public API (``GET /v1/recommendations``, ``POST /v1/events``, ``POST /v1/ads``,
``GET /v1/ads/{id}/image``, ``GET /healthz``): everything it shows, and every request it
sends, is what an integrator's code calls, with the same auth and the same error bodies. The
route adds no server-side behaviour and is left out of the OpenAPI document.

The requests the page sends are built by three JavaScript functions whose Python twins are
here, :func:`recommendation_params`, :func:`slate_events` and :func:`new_ad_body`: the
API-level tests drive the service with the Python ones, and the browser test checks that
the page's real requests equal them.

* a recommendation: ``GET v1/recommendations?user_id=…&k=…[&policy=…]``;
* a click on a card: ``POST v1/events`` with an impression for every shown card (in
  position order) and then a click for the clicked one, all quoting the slate's
  ``request_id`` and its positions, ``timestamp`` = the moment of the click; split into
  batches of at most the API's ``MAX_EVENTS_PER_BATCH`` events (a slate of 1,000 ads plus
  its click would exceed one);
* a new ad: ``POST v1/ads`` with ``{"ad_id", "text"}`` and, when an image was chosen, its
  bytes in base64 as ``image_base64``.

The page keeps a token (for a service with ``ADREC_API_TOKEN``, or ``ADREC_READ_TOKEN`` to
only look) in memory only and sends it as ``Authorization: Bearer …`` on every call; with a
token it fetches the ads' images itself and shows them from ``blob:`` URLs (an ``<img src>``
cannot carry the header). Every failed request is shown with its
status and the API's ``error`` message. Ad and user ids and ad texts are inserted as text
nodes, never as markup; the response's Content-Security-Policy allows only this page's own
script and style (by hash) and same-origin requests, so injected markup could not run
either.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from fastapi import APIRouter, Response

from adrec_assets.online.api.schemas import MAX_EVENTS_PER_BATCH
from adrec_assets.online.service import MAX_ID_CHARS, POLICIES

#: Example users of the built-in synthetic source; ``/demo?users=a,b`` replaces them.
DEFAULT_USERS = ("user-0000005", "user-0000042")
#: Ads per slate the page asks for; ``/demo?k=N`` or the page's field change it.
DEFAULT_K = 8
#: Endpoints the page calls, relative to the page (so a path prefix of a proxy is kept).
ENDPOINTS = ("v1/recommendations", "v1/events", "v1/ads", "v1/ads/{ad_id}/image", "healthz")

router = APIRouter(include_in_schema=False)


# ---------------------------------------------------------------------- the payloads
def recommendation_params(user_id: str, k: int, policy: str | None = None) -> dict[str, str]:
    """Query of ``GET v1/recommendations`` (the page's ``recommendationQuery``); no policy
    means the service's configured one."""
    params = {"user_id": user_id, "k": str(k)}
    if policy:
        params["policy"] = policy
    return params


def slate_events(
    slate: Mapping[str, Any], user_id: str, clicked_position: int, timestamp: float,
    max_batch: int = MAX_EVENTS_PER_BATCH,
) -> list[dict[str, list[dict[str, Any]]]]:  # fmt: skip
    """Bodies of the ``POST v1/events`` calls for a click on the card at ``clicked_position``
    of ``slate`` (a ``GET v1/recommendations`` answer for ``user_id``): the page's
    ``slateEvents``. An impression for every shown card, then the click."""
    items = list(slate["items"])
    clicked = next((item for item in items if item["position"] == clicked_position), None)
    if clicked is None:
        raise ValueError(f"position {clicked_position} is not in the slate (positions 0 to {len(items) - 1})")

    def event(item: Mapping[str, Any], kind: str) -> dict[str, Any]:
        return {"request_id": slate["request_id"], "user_id": user_id, "ad_id": item["ad_id"],
                "position": item["position"], "type": kind, "timestamp": timestamp}  # fmt: skip

    events = [event(item, "impression") for item in items] + [event(clicked, "click")]
    return [{"events": events[start : start + max_batch]} for start in range(0, len(events), max_batch)]


def new_ad_body(ad_id: str, text: str, image: bytes | None = None) -> dict[str, str]:
    """Body of ``POST v1/ads`` (the page's ``newAdBody``): the id as typed without surrounding
    blanks, the text as typed, the image (if one was chosen) as base64."""
    body = {"ad_id": ad_id.strip(), "text": text}
    if image is not None:
        body["image_base64"] = base64.b64encode(image).decode("ascii")
    return body


# ---------------------------------------------------------------------- the page
@router.get("/demo")
def demo_page() -> Response:
    """The page itself; everything else it needs is the public API."""
    page = built_page()
    return Response(page.html, media_type="text/html; charset=utf-8", headers=page.headers)


class _Page:
    def __init__(self, html: str, headers: dict[str, str]) -> None:
        self.html, self.headers = html, headers


def _static(name: str) -> str:
    return resources.files("adrec_assets.online.api").joinpath("static", name).read_text(encoding="utf-8")


# The markup has the placeholders __STYLE__ and __SCRIPT__, the script __CONFIG__. The style
# and the script start on a line of their own inside their elements (the CSP hashes cover
# exactly the elements' text, that newline included).
_HTML = _static("demo.html")
_STYLE = "\n" + _static("demo.css")
_SCRIPT = "\n" + _static("demo.js")


@functools.cache
def built_page() -> _Page:
    """The HTML with its configuration filled in, and the headers that allow exactly its own
    inline script and style (built once: the page does not change while the process runs)."""
    config = {"users": list(DEFAULT_USERS), "k": DEFAULT_K, "policies": list(POLICIES), "maxBatch": MAX_EVENTS_PER_BATCH,
              "maxIdChars": MAX_ID_CHARS}  # fmt: skip
    script = _SCRIPT.replace("__CONFIG__", _script_json(config))
    html = _HTML.replace("__STYLE__", _STYLE).replace("__SCRIPT__", script)
    policy = "; ".join((
        "default-src 'none'",
        f"script-src '{_sha256(script)}'",
        f"style-src '{_sha256(_STYLE)}'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ))  # fmt: skip
    headers = {"Content-Security-Policy": policy, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}  # fmt: skip
    return _Page(html, headers)


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element (no ``</script>`` or ``<!--`` can form)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
