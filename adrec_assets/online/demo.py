"""The demo page of the service: ``GET /demo``, one self-contained HTML page (inline CSS and
vanilla JavaScript, nothing fetched from another origin, so it works offline).

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

The page keeps an API token (for a service with ``ADREC_API_TOKEN``) in memory only and
sends it as ``Authorization: Bearer …`` on writes. Every failed request is shown with its
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
from typing import Any

from fastapi import APIRouter, Response

#: Example users of the built-in synthetic source; ``/demo?users=a,b`` replaces them.
DEFAULT_USERS = ("user-0000005", "user-0000042")
#: Ads per slate the page asks for; ``/demo?k=N`` or the page's field change it.
DEFAULT_K = 8
#: Endpoints the page calls, relative to the page (so a path prefix of a proxy is kept).
ENDPOINTS = ("v1/recommendations", "v1/events", "v1/ads", "v1/ads/{ad_id}/image", "healthz")

router = APIRouter()


# ---------------------------------------------------------------------- the payloads
def recommendation_params(user_id: str, k: int, policy: str | None = None) -> dict[str, str]:
    """Query of ``GET v1/recommendations`` (the page's ``recommendationQuery``); no policy
    means the service's configured one."""
    params = {"user_id": user_id, "k": str(k)}
    if policy:
        params["policy"] = policy
    return params


def slate_events(
    slate: Mapping[str, Any], user_id: str, clicked_position: int, timestamp: float, max_batch: int | None = None
) -> list[dict[str, list[dict[str, Any]]]]:
    """Bodies of the ``POST v1/events`` calls for a click on the card at ``clicked_position``
    of ``slate`` (a ``GET v1/recommendations`` answer for ``user_id``): the page's
    ``slateEvents``. An impression for every shown card, then the click."""
    if max_batch is None:
        from adrec_assets.online.app import MAX_EVENTS_PER_BATCH

        max_batch = MAX_EVENTS_PER_BATCH
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
@router.get("/demo", include_in_schema=False)
def demo_page() -> Response:
    """The page itself; everything else it needs is the public API."""
    page = built_page()
    return Response(page.html, media_type="text/html; charset=utf-8", headers=page.headers)


class _Page:
    def __init__(self, html: str, headers: dict[str, str]) -> None:
        self.html, self.headers = html, headers


@functools.cache
def built_page() -> _Page:
    """The HTML with its configuration filled in, and the headers that allow exactly its own
    inline script and style (built once: the page does not change while the process runs)."""
    from adrec_assets.online.app import MAX_EVENTS_PER_BATCH
    from adrec_assets.online.service import MAX_ID_CHARS, POLICIES

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


_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>adrec demo</title>
<link rel="icon" href="data:,">
<style>__STYLE__</style>
</head>
<body>
<header>
  <h1>adrec <span class="muted">demo</span></h1>
  <p id="health" class="muted">asking the service (GET /healthz)…</p>
</header>
<section id="controls" aria-label="user">
  <div class="row">
    <span class="label">Example users</span>
    <span id="examples"></span>
    <button type="button" id="new-user" class="secondary">New user</button>
  </div>
  <form id="user-form" class="row" autocomplete="off">
    <label>User id <input id="user-id" name="user_id" spellcheck="false"
      placeholder="any id; one the model never saw starts from the global mean"></label>
    <label>Ads <input id="k" name="k" type="number" min="1" max="1000" step="1"></label>
    <label>Policy <select id="policy" name="policy"><option value="">as configured</option></select></label>
    <button type="submit" id="recommend">Recommend</button>
    <label class="token">API token <input id="token" type="password" autocomplete="off"
      placeholder="only if the service sets ADREC_API_TOKEN"></label>
  </form>
</section>
<div id="error" role="alert" hidden></div>
<main>
  <section id="served" aria-label="recommendations">
    <div id="slate-info" hidden>
      <span class="fact">user <b id="slate-user"></b></span>
      <span class="fact">status <b id="user-status"></b></span>
      <span class="fact">policy <b id="slate-policy"></b></span>
      <span class="fact">arms <b id="slate-arms"></b></span>
      <span class="fact">model <b id="model-version"></b></span>
    </div>
    <p id="message" role="status" class="muted">Choose a user to see their ads. Clicking an ad records the
      impressions of the shown ads and the click, then asks again.</p>
    <ol id="cards"></ol>
  </section>
  <aside id="add-ad" aria-label="add an ad">
    <h2>Add an ad</h2>
    <form id="ad-form" autocomplete="off">
      <label>Ad id <input id="ad-id" name="ad_id" spellcheck="false" placeholder="e.g. ad-my-shop-1"></label>
      <label>Text <textarea id="ad-text" name="text" rows="4" placeholder="the ad copy"></textarea></label>
      <label>Image (optional) <input id="ad-image" name="image" type="file" accept="image/*"></label>
      <img id="ad-preview" alt="" hidden>
      <button type="submit" id="add-ad-button">Add ad (POST /v1/ads)</button>
    </form>
    <p id="ad-result" class="muted">The new ad is encoded, projected into the user space and indexed:
      it can be served in the very next request. Raise "Ads" to the number of ads in the index to see
      where it ranks for this user.</p>
  </aside>
</main>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
:root { --ink: #1d2430; --muted: #5d6775; --line: #d9dee5; --accent: #2457c5; --bad: #b3261e; --ok: #1e7a3c;
        --paper: #f5f6f8; font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; padding: 14px 20px 28px; color: var(--ink); background: var(--paper); font-size: 14px; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
h1 { font-size: 20px; margin: 0 0 6px; }
h2 { font-size: 15px; margin: 0 0 8px; }
.muted { color: var(--muted); }
.row { display: flex; align-items: center; gap: 8px 12px; flex-wrap: wrap; margin: 6px 0; }
.label { font-weight: 600; }
label { display: inline-flex; align-items: center; gap: 6px; }
input, select, textarea, button { font: inherit; color: inherit; }
input, select, textarea { border: 1px solid var(--line); border-radius: 6px; padding: 5px 8px; background: #fff; }
#user-id { width: 300px; } #k { width: 72px; } .token input { width: 190px; }
button { border: 1px solid var(--accent); background: var(--accent); color: #fff; border-radius: 6px;
         padding: 5px 12px; cursor: pointer; }
button.secondary, #examples button { background: #fff; color: var(--accent); }
#examples { display: inline-flex; flex-wrap: wrap; gap: 6px; }
#examples button.chosen { background: var(--accent); color: #fff; }
button:disabled { opacity: .55; cursor: progress; }
#error { border: 1px solid var(--bad); background: #fdeceb; color: var(--bad); border-radius: 6px;
         padding: 8px 12px; margin: 8px 0; white-space: pre-wrap; }
main { display: grid; grid-template-columns: minmax(0, 1fr) 300px; gap: 18px; margin-top: 8px; }
#slate-info { display: flex; flex-wrap: wrap; gap: 6px 8px; }
.fact { background: #fff; border: 1px solid var(--line); border-radius: 999px; padding: 3px 10px; }
.fact b { font-weight: 600; }
#user-status.known { color: var(--ink); } #user-status.updated_online { color: var(--ok); }
#user-status.new { color: var(--accent); }
#message { margin: 8px 0; min-height: 1.3em; }
#cards { list-style: none; margin: 0; padding: 0; display: grid; gap: 12px;
         grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; overflow: hidden; cursor: pointer;
        display: flex; flex-direction: column; transition: box-shadow .15s, transform .15s; }
.card:hover, .card:focus { box-shadow: 0 3px 12px rgba(20, 40, 80, .18); transform: translateY(-1px); outline: none; }
.card.just-added { border: 2px solid var(--ok); }
.media { height: 88px; display: flex; align-items: center; justify-content: center; background: #eef1f5; }
.media img { height: 80px; width: 80px; object-fit: contain; image-rendering: pixelated; }
.media .no-image { color: rgba(255, 255, 255, .92); font-size: 12px; letter-spacing: .04em; }
.body { padding: 8px 10px 4px; flex: 1; }
.text { margin: 0; line-height: 1.35; display: -webkit-box; -webkit-line-clamp: 4; -webkit-box-orient: vertical;
        overflow: hidden; }
.meta { display: flex; flex-wrap: wrap; gap: 4px 8px; align-items: center; padding: 6px 10px 8px;
        font-size: 12px; color: var(--muted); }
.pos { font-weight: 700; color: var(--ink); }
.ad-id { font-family: ui-monospace, "DejaVu Sans Mono", monospace; word-break: break-all; }
.badge { border-radius: 999px; padding: 1px 7px; font-size: 11px; font-weight: 600; }
.badge.up, .badge.entered { background: #e3f4e8; color: var(--ok); }
.badge.down { background: #fbeaea; color: var(--bad); }
.badge.live { background: #e8eefb; color: var(--accent); }
.image-note { font-size: 11px; color: var(--bad); }
#add-ad { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px; align-self: start;
          position: sticky; top: 12px; }
#ad-form { display: flex; flex-direction: column; gap: 8px; }
#ad-form label { flex-direction: column; align-items: stretch; gap: 3px; }
#ad-preview { max-width: 96px; max-height: 96px; image-rendering: pixelated; }
#ad-result.ok { color: var(--ok); } #ad-result.bad { color: var(--bad); }
@media (max-width: 820px) { main { grid-template-columns: 1fr; } #add-ad { position: static; } }
"""

_SCRIPT = """
"use strict";
const CONFIG = __CONFIG__;
const state = {user: null, slate: null, slateUser: null, previous: null, token: "", busy: false, lastAdded: null};
const $ = (id) => document.getElementById(id);
const STATUS_WORDS = {known: "known", updated_online: "updated online", new: "new"};

class ApiError extends Error {
  constructor(method, path, status, message) {
    super(message);
    this.method = method; this.path = path; this.status = status;
  }
  describe() {
    const where = this.method + " " + this.path.split("?")[0];
    return this.status ? where + " \\u2192 " + this.status + ": " + this.message : where + ": " + this.message;
  }
}

async function api(method, path, body) {
  const headers = {"Accept": "application/json"};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.token) headers["Authorization"] = "Bearer " + state.token;
  let response;
  try {
    response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (exc) {
    throw new ApiError(method, path, 0, "the service cannot be reached (" + exc.message + ")");
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    let message = (data && typeof data.error === "string") ? data.error : (text.slice(0, 300) || response.statusText);
    if (data && data.field) message += " (field " + data.field + ")";
    throw new ApiError(method, path, response.status, message);
  }
  return data;
}

function showError(exc) {
  const box = $("error");
  box.textContent = exc instanceof ApiError ? exc.describe() : "Unexpected error: " + exc;
  box.hidden = false;
}
function clearError() { $("error").hidden = true; $("error").textContent = ""; }
function say(text) { $("message").textContent = text; }

// ---- the payloads (their Python twins: adrec_assets/online/demo.py)
function recommendationQuery(userId, k, policy) {
  const query = new URLSearchParams({user_id: userId, k: String(k)});
  if (policy) query.set("policy", policy);
  return "v1/recommendations?" + query.toString();
}

function slateEvents(slate, userId, clickedPosition, timestamp) {
  const items = slate.items;
  const clicked = items.find((item) => item.position === clickedPosition);
  const event = (item, type) => ({request_id: slate.request_id, user_id: userId, ad_id: item.ad_id,
                                  position: item.position, type: type, timestamp: timestamp});
  const events = items.map((item) => event(item, "impression"));
  events.push(event(clicked, "click"));
  const batches = [];
  for (let start = 0; start < events.length; start += CONFIG.maxBatch) {
    batches.push({events: events.slice(start, start + CONFIG.maxBatch)});
  }
  return batches;
}

function newAdBody(adId, text, imageBase64) {
  const body = {ad_id: adId.trim(), text: text};
  if (imageBase64 !== null) body.image_base64 = imageBase64;
  return body;
}

// ---- health
async function refreshHealth() {
  try {
    const health = await api("GET", "healthz");
    const parts = ["source " + health.source, "model " + (health.model_version || "none"), health.n_ads + " ads in the index",
                   "encoder " + health.encoder, "store " + health.store];
    if (health.status !== "ok") parts.unshift("DEGRADED");
    $("health").textContent = parts.join(" \\u00b7 ");
    return health;
  } catch (exc) {
    $("health").textContent = "the service did not answer /healthz";
    showError(exc);
    return null;
  }
}

// ---- recommendations
function setBusy(busy) {
  state.busy = busy;
  for (const id of ["recommend", "add-ad-button", "new-user"]) $(id).disabled = busy;
  document.body.setAttribute("aria-busy", busy ? "true" : "false");
}

function chosenK() {
  const k = Number($("k").value);
  if (!Number.isInteger(k) || k < 1 || k > 1000) throw new ApiError("GET", "v1/recommendations", 0,
    "Ads must be a whole number from 1 to 1000 (the API's limit), got " + JSON.stringify($("k").value));
  return k;
}

async function loadRecommendations(user, note) {
  clearError();
  let k;
  try { k = chosenK(); } catch (exc) { showError(exc); return null; }
  setBusy(true);
  try {
    const slate = await api("GET", recommendationQuery(user, k, $("policy").value));
    const previous = state.slateUser === user && state.slate ? state.slate : null;
    state.user = user; state.slate = slate; state.slateUser = user;
    render(slate, user, previous, note);
    return slate;
  } catch (exc) {
    showError(exc);
    return null;
  } finally {
    setBusy(false);
  }
}

function hue(text) {  // FNV-1a: neighbouring ids get far-apart colours
  let h = 0x811c9dc5;
  for (const ch of text) h = Math.imul(h ^ ch.codePointAt(0), 0x01000193) >>> 0;
  return h % 360;
}

function render(slate, user, previous, note) {
  $("slate-info").hidden = false;
  $("slate-user").textContent = user;
  const status = $("user-status");
  status.textContent = STATUS_WORDS[slate.user_status] || slate.user_status;
  status.className = slate.user_status;
  $("slate-policy").textContent = slate.policy + (slate.randomized ? " (order randomized)" : "");
  $("slate-arms").textContent = slate.experiments.length
    ? slate.experiments.map((a) => a.experiment + ": " + a.arm).join(", ") : "no experiment";
  $("model-version").textContent = slate.model_version;
  for (const button of document.querySelectorAll("#examples button")) {
    button.classList.toggle("chosen", button.dataset.user === user);
  }
  const before = new Map((previous ? previous.items : []).map((item) => [item.ad_id, item.position]));
  const cards = $("cards");
  cards.replaceChildren(...slate.items.map((item) => card(item, previous ? before : null)));
  let summary = slate.items.length + " ads for " + user + ".";
  if (previous) {
    const entered = slate.items.filter((item) => !before.has(item.ad_id)).length;
    const moved = slate.items.filter((item) => before.has(item.ad_id) && before.get(item.ad_id) !== item.position).length;
    summary += (entered || moved) ? " The list changed: " + entered + " new in the list, " + moved + " moved."
                                  : " The list did not change.";
  } else if (slate.items.length) {
    summary += " Click an ad to record it and see the list change.";
  }
  say((note ? note + " " : "") + summary);
  const added = state.lastAdded && cards.querySelector('[data-ad-id="' + CSS.escape(state.lastAdded) + '"]');
  if (added) added.scrollIntoView({block: "center"});
}

function card(item, before) {
  const li = document.createElement("li");
  li.className = "card" + (item.ad_id === state.lastAdded ? " just-added" : "");
  li.dataset.adId = item.ad_id;
  li.dataset.position = String(item.position);
  li.tabIndex = 0;
  li.setAttribute("role", "button");
  li.setAttribute("aria-label", "click ad " + item.ad_id + " at position " + (item.position + 1));
  const media = document.createElement("div");
  media.className = "media";
  if (item.has_image) {
    const img = document.createElement("img");
    img.alt = "image of " + item.ad_id;
    img.src = "v1/ads/" + encodeURIComponent(item.ad_id) + "/image";
    img.addEventListener("error", () => {
      const note = document.createElement("span");
      note.className = "image-note";
      note.textContent = "GET v1/ads/" + item.ad_id + "/image failed";
      img.replaceWith(note);
    });
    media.append(img);
  } else {
    media.style.background = "hsl(" + hue(item.ad_id) + ", 32%, 60%)";
    const none = document.createElement("span");
    none.className = "no-image";
    none.textContent = "text only";
    media.append(none);
  }
  const body = document.createElement("div");
  body.className = "body";
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = item.text;
  text.title = item.text;
  body.append(text);
  const meta = document.createElement("div");
  meta.className = "meta";
  const span = (cls, content) => {
    const s = document.createElement("span");
    s.className = cls; s.textContent = content; meta.append(s); return s;
  };
  span("pos", "#" + (item.position + 1));
  span("ad-id", item.ad_id);
  span("score", "score " + item.score.toFixed(3));
  if (item.live) span("badge live", "live ad");
  if (before) {
    if (!before.has(item.ad_id)) span("badge entered", "new in list");
    else if (before.get(item.ad_id) > item.position) span("badge up", "\\u25b2 " + (before.get(item.ad_id) - item.position));
    else if (before.get(item.ad_id) < item.position) span("badge down", "\\u25bc " + (item.position - before.get(item.ad_id)));
  }
  li.append(media, body, meta);
  li.addEventListener("click", () => clickCard(item));
  li.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); clickCard(item); }
  });
  return li;
}

async function clickCard(item) {
  if (state.busy || !state.slate) return;
  const slate = state.slate, user = state.slateUser;
  clearError();
  setBusy(true);
  let recorded = {accepted: 0, duplicates: 0, clicks: 0};
  try {
    for (const batch of slateEvents(slate, user, item.position, Date.now() / 1000)) {
      const answer = await api("POST", "v1/events", batch);
      for (const key of Object.keys(recorded)) recorded[key] += answer[key];
    }
  } catch (exc) {
    showError(exc);
    setBusy(false);
    return;
  }
  setBusy(false);
  await loadRecommendations(user, "Clicked " + item.ad_id + " at #" + (item.position + 1) + ": " + recorded.accepted
    + " events recorded (" + recorded.clicks + " click, " + recorded.duplicates + " duplicates).");
}

// ---- new ads
function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
    reader.onerror = () => reject(new Error("cannot read " + file.name + ": " + reader.error));
    reader.readAsDataURL(file);
  });
}

async function addAd(event) {
  event.preventDefault();
  if (state.busy) return;
  clearError();
  const result = $("ad-result");
  const file = $("ad-image").files[0] || null;
  let image = null;
  try {
    if (file) image = await readBase64(file);
  } catch (exc) {
    result.className = "bad"; result.textContent = String(exc.message); return;
  }
  const body = newAdBody($("ad-id").value, $("ad-text").value, image);
  setBusy(true);
  let added;
  try {
    added = await api("POST", "v1/ads", body);
  } catch (exc) {
    result.className = "bad";
    result.textContent = exc instanceof ApiError ? exc.describe() : String(exc);
    showError(exc);
    return;
  } finally {
    setBusy(false);
  }
  state.lastAdded = added.ad_id;
  result.className = "ok";
  result.textContent = "201 Created: " + added.ad_id + " is in the live index (slot " + added.slot + ", popularity bias "
    + added.score_bias.toFixed(3) + ", model " + added.model_version + ")" + (file ? " with its image." : ", text only.");
  await refreshHealth();
  if (state.slateUser) {
    const slate = await loadRecommendations(state.slateUser, "Added " + added.ad_id + ".");
    if (slate && !slate.items.some((item) => item.ad_id === added.ad_id)) {
      say($("message").textContent + " " + added.ad_id + " is not among this user's top " + slate.items.length
        + ": raise Ads to see where it ranks, or click ads like it.");
    }
  }
}

// ---- set-up
function chooseUser(user) {
  const id = user.trim();
  if (!id) { showError(new ApiError("GET", "v1/recommendations", 0, "type a user id or choose an example user")); return; }
  $("user-id").value = id;
  loadRecommendations(id, null);
}

function start() {
  const params = new URLSearchParams(window.location.search);
  const users = params.has("users") ? params.get("users").split(",").map((u) => u.trim()).filter(Boolean) : CONFIG.users;
  for (const user of users) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.user = user;
    button.textContent = user;
    button.addEventListener("click", () => chooseUser(user));
    $("examples").append(button);
  }
  for (const policy of CONFIG.policies) {
    const option = document.createElement("option");
    option.value = policy; option.textContent = policy;
    $("policy").append(option);
  }
  $("k").value = params.get("k") || String(CONFIG.k);
  $("user-id").maxLength = CONFIG.maxIdChars;
  $("ad-id").maxLength = CONFIG.maxIdChars;
  $("token").addEventListener("input", () => { state.token = $("token").value.trim(); });
  $("user-form").addEventListener("submit", (event) => { event.preventDefault(); chooseUser($("user-id").value); });
  $("new-user").addEventListener("click", () => {
    const bytes = crypto.getRandomValues(new Uint8Array(4));
    chooseUser("visitor-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(""));
  });
  $("ad-image").addEventListener("change", () => {
    const file = $("ad-image").files[0], preview = $("ad-preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.hidden = !file;
    if (file) preview.src = URL.createObjectURL(file); else preview.removeAttribute("src");
  });
  $("ad-form").addEventListener("submit", addAd);
  refreshHealth();
  if (params.get("user")) chooseUser(params.get("user"));
}

start();
"""
