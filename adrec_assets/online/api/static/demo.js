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
    return this.status ? where + " \u2192 " + this.status + ": " + this.message : where + ": " + this.message;
  }
}

async function api(method, path, body) {
  const headers = {"Accept": "application/json"};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.token) headers["Authorization"] = "Bearer " + state.token;  // writes, and reads behind a read token
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

// ---- the payloads (their Python twins: adrec_assets/online/api/routers/demo.py)
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
    $("health").textContent = parts.join(" \u00b7 ");
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

// An <img src> request cannot carry the Authorization header: with a token the image is
// fetched with it and shown from a blob: URL (the page's CSP allows blob: images).
async function showImage(img, path, failed) {
  if (!state.token) { img.src = path; return; }
  try {
    const response = await fetch(path, {headers: {"Authorization": "Bearer " + state.token}});
    if (!response.ok) { failed(); return; }
    const url = URL.createObjectURL(await response.blob());
    img.addEventListener("load", () => URL.revokeObjectURL(url), {once: true});
    img.src = url;
  } catch (_) {
    failed();
  }
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
    const failed = () => {
      const note = document.createElement("span");
      note.className = "image-note";
      note.textContent = "GET v1/ads/" + item.ad_id + "/image failed";
      img.replaceWith(note);
    };
    img.addEventListener("error", failed);
    showImage(img, "v1/ads/" + encodeURIComponent(item.ad_id) + "/image", failed);
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
    else if (before.get(item.ad_id) > item.position) span("badge up", "\u25b2 " + (before.get(item.ad_id) - item.position));
    else if (before.get(item.ad_id) < item.position) span("badge down", "\u25bc " + (item.position - before.get(item.ad_id)));
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
