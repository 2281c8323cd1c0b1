"""The recommendation service's logic, without HTTP (plain Python: no Dagster, no FastAPI).

:class:`RecommendationService` holds the source's published snapshot as one immutable
:class:`~adrec_assets.online.state.ModelState` (:mod:`adrec_assets.online.state`; its
settings: :class:`~adrec_assets.online.config.ServingConfig`) and answers the four things the
API offers:

* ``recommend``: one inner-product search of the snapshot's ``ad_index`` with the user's
  vector (online EMA vector > trained vector > global mean) and the policy folded into the
  query; the served slate is remembered in the online store so that its events can be
  checked and attributed (policy, propensity, experiment arm, model version);
* ``record_events``: impressions and clicks of served slates; a click moves the user's
  online vector ``u <- normalize((1 - a) u + a p_ad)`` (``a`` grows with the position-bias
  click weight), every event is queued in the store and flushed as files into the source
  folder, whose click files the pipeline retrains on;
* ``add_ad`` / ``retire_ad``: ads encoded with the snapshot's encoder, projected with its
  projector and added to the live index (kept in the store, so restarts and replicas serve
  them); retired ads are removed and stay removed across reloads;
* ``reload_if_changed``: a newer published snapshot is loaded completely, then swapped in
  with one assignment, so a request is answered by exactly one model version
  (:func:`~adrec_assets.online.state.load_state`).

Every bad input raises a :class:`ServiceError` subclass carrying its HTTP status (4xx),
checked before any state changes. Raw user ids never leave :meth:`_pseudonym`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Container, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from adrec_assets.ml.encoders.base import ImageAccess
from adrec_assets.ml.fields import MAX_FIELD_CHARS, NUMERIC, parse_number
from adrec_assets.online.config import ServingConfig
from adrec_assets.online.events import EventFlusher
from adrec_assets.online.experiments import ExperimentSet, format_assignment_label, load_experiments, merge_assignments
from adrec_assets.online.index import UnknownAdError
from adrec_assets.online.policy import POLICIES, make_policy
from adrec_assets.online.position_bias import click_weight, impression_weights, theta_covering
from adrec_assets.online.posterior import LaplaceLogisticPosterior, ad_features
from adrec_assets.online.slot_counts import SlotCounts
from adrec_assets.online.state import (
    ModelState,
    apply_live_ads,
    fresh_effects_blob,
    is_live,
    live_fields,
    load_state,
    project_content,
    register_fresh,
)
from adrec_assets.online.store import ConcurrentUpdateError, OnlineStore, StoreUnavailableError
from adrec_assets.online.user_posterior import UserBelief, belief_to_record, draw_spread, update_belief
from adrec_assets.privacy import key_fingerprint, pseudonymize
from adrec_assets.snapshots import SnapshotError, SnapshotStore

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # what recommend() hands out
MAX_ID_CHARS = 256
# A new ad's id is one URL path segment (``/v1/ads/{ad_id}``): a "/" could never be retired or
# read back, and control characters or surrounding blanks would not survive the round trip.
_AD_ID_REFUSED = re.compile(r"[/\x00-\x1f\x7f]|^\s|\s$")
#: ``/healthz`` counts queued events up to this many (counting more decodes them all).
PENDING_SHOWN = 1000
#: Seconds a failed store call keeps ``/healthz`` degraded after the last failure.
STORE_TROUBLE_SECONDS = 30.0


def _event_id(request_id: str, position: int, kind: str) -> str:
    """An event's id: the key it is claimed under in the store and its name in the event log."""
    return f"{request_id}:{position}:{kind}"


# ---------------------------------------------------------------------- errors
class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


class BadRequest(ServiceError):
    status = 422


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class TooLarge(ServiceError):
    status = 413


class Unavailable(ServiceError):
    status = 503


# ---------------------------------------------------------------------- the service
class RecommendationService:
    """See the module docstring. Thread-safe: FastAPI calls it from its worker threads."""

    def __init__(
        self, config: ServingConfig, online: OnlineStore, clock: Callable[[], float] = time.time,
        id_key: str | None = None,
    ) -> None:  # fmt: skip
        """``id_key``: the pseudonym key, else ``$ADREC_ID_KEY`` (:func:`~adrec_assets.privacy.resolve_key`)."""
        from adrec_assets.privacy import resolve_key

        self.config = config
        self.online = online
        self._clock = clock  # served_at, settle ages: a simulation passes its simulated clock
        self.snapshots = SnapshotStore(config.artifacts_root, config.source)
        self._key = resolve_key(id_key)
        self._state: ModelState | None = None
        self._pinned: dict[str, ModelState] = {}  # versions experiment arms are served from
        self._reload_lock = threading.Lock()
        self._learn_lock = threading.Lock()
        self._encoder: Any = None
        self._encoder_error: str | None = "the encoder is loading"
        self._rng_counter = 0
        self.slot_counts = SlotCounts()  # per policy: slots, fresh, exploratory (/metrics)
        self._counter_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Impressions waiting settle_seconds for their click; a click is looked up in the store
        # when its impression settles (its claim), so nothing here waits for an impression.
        self._unsettled: list[dict[str, Any]] = []
        self.experiments = load_experiments(config.experiments_path) if config.experiments_path else ExperimentSet(())
        # The lease outlives several flush periods, so a live holder never loses it between flushes.
        self.flusher = EventFlusher(
            online, config.sources_root / config.source, lease_seconds=max(60.0, 3 * config.flush_seconds)
        )
        self.reloads = 0
        self._store_trouble: tuple[float, str] | None = None  # (when, what) of the last failed store call
        self._flush_error: tuple[float, str] | None = None  # (since, what) while flushing fails

    # ------------------------------------------------------------------ lifecycle
    def start(self, background: bool = True) -> None:
        """Load the published snapshot (fails if there is none), then start the reload,
        flush and encoder-loading threads."""
        self.reload_if_changed()
        if self._state is None:
            raise SnapshotError(f"source {self.config.source!r} has no published snapshot")
        self._check_key()
        if not background:
            return
        if self.config.load_encoder:
            self._spawn(self._load_encoder, "encoder")
        else:
            self._encoder_error = "this replica was started without an encoder (load_encoder=False)"
        self._spawn(self._every(self.config.reload_seconds, self.refresh), "reload")
        self._spawn(self._every(self.config.flush_seconds, self.flush), "flush")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self.flush()
        self.flusher.release()  # another replica may flush at once, not after the lease's TTL

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=f"adrec-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _every(self, seconds: float, action: Any) -> Any:
        def loop() -> None:
            while not self._stop.wait(seconds):
                try:
                    action()
                except Exception:  # noqa: BLE001 - a background failure is logged, never fatal
                    log.exception(
                        "background %s failed; retrying in %.1f s", getattr(action, "__name__", action), seconds
                    )

        return loop

    def _check_key(self) -> None:
        recorded = self.state.snapshot.info.get("key_fingerprint", "")
        if recorded and recorded != key_fingerprint(self._key):
            raise SnapshotError(
                f"ADREC_ID_KEY differs from the key source {self.config.source!r} was pseudonymized with "
                f"(fingerprint {key_fingerprint(self._key)} vs {recorded}): every user would look new; "
                "start the service with the pipeline's key"
            )

    def _load_encoder(self) -> None:
        wanted = self.state.snapshot.info.get("encoder_id", "")
        name = wanted.split(":", 1)[0] if wanted else "offline"
        try:
            encoder = shared_encoder(name)
        except Exception as exc:  # noqa: BLE001 - the service still serves; only new ads wait
            self._encoder_error = f"encoder {name!r} cannot be loaded here ({type(exc).__name__}: {exc})"
            log.warning(self._encoder_error)
            return
        if encoder.encoder_id != wanted:
            self._encoder_error = f"this machine's encoder is {encoder.encoder_id}, the snapshot's {wanted}"
            return
        encoder.encode(["warm-up"], [None])  # first call pays for lazy initialization, not a request
        self._encoder, self._encoder_error = encoder, None

    @property
    def state(self) -> ModelState:
        if self._state is None:
            raise Unavailable("no published snapshot is loaded yet")
        return self._state

    def serving(self) -> tuple[str | None, int, int]:
        """(served model version, ads in its index, reloads so far); (None, 0, reloads) before
        the first snapshot loads. Never raises: read by the metrics at every scrape."""
        state = self._state
        return (None, 0, self.reloads) if state is None else (state.version, len(state.index), self.reloads)

    def reload_if_changed(self) -> bool:
        """Swap to the published snapshot if it is newer than the one served; True if swapped."""
        with self._reload_lock:
            current = self.snapshots.current_id()
            if current is None or (self._state is not None and self._state.version == current):
                return False
            new = load_state(
                self.snapshots,
                self.snapshots.snapshot(current),
                self.online,
                self.config.index_backend,
                self.config.max_k,
                self.config.fresh_prior_sd,
                self.config.fresh_scope,
                self.config.user_rank if self.config.user_update == "posterior" else None,
                self.config.user_prior_spread,
                self.config.known_user_spread,
            )
            self._pinned = self._load_pinned(new)
            old, self._state = self._state, new  # the one moment a new version starts serving
            self.reloads += 1
            if old is not None and old.space != new.space:
                self.online.drop_user_space(old.space)  # online vectors of a retrained space are meaningless
            log.info("serving snapshot %s (%d ads)", new.version, len(new.index))
            return True

    def refresh(self) -> None:
        """What the reload thread does: a newer snapshot if there is one, else the live ads and
        retirements other replicas recorded in the shared store."""
        if not self.reload_if_changed():
            self.sync_live_ads()

    def sync_live_ads(self) -> int:
        """Apply live ads and retirements recorded in the store since this state was loaded
        (by this replica or another); returns how many changes were applied."""
        state = self._state
        return 0 if state is None else apply_live_ads(state, self.online)

    def _load_pinned(self, current: ModelState) -> dict[str, ModelState]:
        wanted = {a.model_version for e in self.experiments.experiments for a in e.arms if a.model_version}
        pinned = {}
        for version in wanted - {current.version}:
            try:
                pinned[version] = self._pinned.get(version) or load_state(
                    self.snapshots,
                    self.snapshots.snapshot(version),
                    self.online,
                    self.config.index_backend,
                    self.config.max_k,
                    self.config.fresh_prior_sd,
                    self.config.fresh_scope,
                    self.config.user_rank if self.config.user_update == "posterior" else None,
                    self.config.user_prior_spread,
                    self.config.known_user_spread,
                )
            except SnapshotError as exc:
                log.warning("experiment arm model_version %s cannot be served: %s", version, exc)
        return pinned

    # ------------------------------------------------------------------ helpers
    def _pseudonym(self, user_id: str) -> str:
        if not isinstance(user_id, str) or not user_id.strip():
            raise BadRequest("user_id must be a non-empty string", "user_id")
        if len(user_id) > MAX_ID_CHARS:
            raise BadRequest(f"user_id has {len(user_id)} characters, more than {MAX_ID_CHARS}", "user_id")
        return pseudonymize(user_id, self._key)

    def _next_request_id(self) -> str:
        if self.config.seed is None:
            return uuid.uuid4().hex
        with self._counter_lock:
            self._rng_counter += 1
            return hashlib.sha256(f"{self.config.seed}:{self._rng_counter}".encode()).hexdigest()[:32]

    @staticmethod
    def _rng(request_id: str) -> np.random.Generator:
        return np.random.default_rng(int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little"))

    def _ranking_posterior(self, state: ModelState) -> LaplaceLogisticPosterior:
        """The shared click model Thompson ranks with: its online posterior, or its prior (whose
        mean ranks as today's score does; the online posterior is still learnt and stored)."""
        if self.config.shared_model == "online":
            return state.posterior
        return _shared_prior(state.posterior.dim)

    def _policy(self, state: ModelState, name: str, belief: UserBelief | None = None) -> Any:
        options: dict[str, Any] = {"randomized_share": self.config.randomized_share}
        if name == "thompson":
            online = self.config.shared_model == "online"
            options["posterior"] = self._ranking_posterior(state)
            options["fresh"] = state.fresh
            options["fresh_share"] = self.config.fresh_share
            options["fresh_rotation"] = self.config.fresh_rotation
            options["shared_scale"] = self.config.shared_exploration if online else 0.0
            if belief is not None and state.user_prior is not None and self.config.user_exploration > 0:
                options["user_spread"] = self.config.user_exploration * draw_spread(belief, state.user_prior)
        if name == "epsilon_greedy":
            options["epsilon"] = self.config.epsilon
        return make_policy(name, **options)

    def ad_info(self, state: ModelState, ad_id: str) -> dict[str, Any]:
        row = state.catalog_row.get(ad_id)
        if row is not None:
            fields = {name: str(cells[row]) for name, cells in state.catalog.fields.cells.items()}
            return {"text": str(state.catalog.texts[row]), "has_image": bool(state.catalog.image_paths[row]),
                    "live": False, "fields": fields}  # fmt: skip
        meta = state.live_meta.get(ad_id)
        if meta is not None:
            fields = {name: cells[0] for name, cells in live_fields(meta).items()}
            return {"text": meta.get("text", ""), "has_image": meta.get("image") == "1", "live": True, "fields": fields}
        raise NotFound(f"ad {ad_id!r} is not in snapshot {state.version} nor among the live ads", "ad_id")

    # ------------------------------------------------------------------ recommend
    def recommend(self, user_id: str, k: int, policy: str | None = None) -> dict[str, Any]:
        if not isinstance(k, int) or not 1 <= k <= self.config.max_k:
            raise BadRequest(f"k must be an integer from 1 to {self.config.max_k}, got {k!r}", "k")
        if policy is not None and policy not in POLICIES:
            raise BadRequest(f"policy must be one of {list(POLICIES)}, got {policy!r}", "policy")
        pseudonym = self._pseudonym(user_id)
        now = self._clock()
        assignments = self.experiments.assign(pseudonym, datetime.fromtimestamp(now, UTC))
        overrides = merge_assignments(assignments)
        state = self.state  # one snapshot for the whole request
        if overrides.model_version and overrides.model_version != state.version:
            state = self._pinned.get(overrides.model_version, state)
        chosen = policy or overrides.policy or self.config.default_policy
        try:
            online = self.online.get_user(state.space, pseudonym)
        except StoreUnavailableError as exc:  # serve from the snapshot alone: the trained vector
            self._store_failed(exc)
            online = None
        belief = None
        if state.user_prior is not None:  # the per-user posterior: greedy serves its mean
            belief, status = state.user_belief(pseudonym, online)
            vector = belief.mean.astype(np.float32)
        else:
            vector, status = state.user_vector(pseudonym, online)
        request_id = self._next_request_id()
        with _one_blas_thread():
            slate = self._policy(state, chosen, belief).recommend(vector, state.index, k, self._rng(request_id))
        flags = self.slot_counts.add(slate, state.fresh)  # per served slot: fresh ad, exploratory
        served = [
            (int(slot), float(score), float(p))
            for slot, score, p in zip(slate.slots, slate.scores, slate.propensities)
            if slot >= 0
        ]
        ad_ids = state.index.ad_ids(np.asarray([s for s, _, _ in served], dtype=np.int64)).tolist()
        label = format_assignment_label(assignments)
        record = {
            "user": pseudonym,
            "model_version": state.version,
            "space": state.space,
            "policy": slate.policy,
            "randomized": bool(slate.randomized),
            "experiments": label,
            "ads": ad_ids,
            "propensities": [p for _, _, p in served],
            "scores": [s for _, s, _ in served],
            "fresh": flags.fresh,
            "explored": flags.explored,
            "served_at": now,
        }
        try:
            self.online.put_request(request_id, record, self.config.request_ttl_seconds)
            recorded = True
        except StoreUnavailableError as exc:  # a read never fails for want of a write
            self._store_failed(exc)
            recorded = False
        items = []
        for position, (ad_id, (_, score, propensity)) in enumerate(zip(ad_ids, served)):
            info = self.ad_info(state, ad_id)
            items.append({"ad_id": ad_id, "position": position, "score": score, "propensity": propensity, **info})
        return {
            "request_id": request_id,
            "model_version": state.version,
            "user_status": status,
            "policy": slate.policy,
            "randomized": bool(slate.randomized),
            "experiments": [{"experiment": a.experiment, "arm": a.arm} for a in assignments],
            "items": items,
            "recorded": recorded,
        }

    # ------------------------------------------------------------------ events
    def record_events(self, events: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Validate every event first (nothing changes if one is bad), then apply them."""
        state = self.state
        records: dict[str, dict[str, Any]] = {}
        candidates, duplicates = [], 0
        batch_keys: set[str] = set()
        for number, event in enumerate(events):
            where = f"events[{number}]"
            request_id = event["request_id"]
            record = records.get(request_id) or (
                self.online.get_request(request_id) if _REQUEST_ID.fullmatch(request_id) else None
            )
            if record is None:
                raise NotFound(f"{where}.request_id {request_id!r} is unknown or expired: post events of served requests",
                               f"{where}.request_id")  # fmt: skip
            records[request_id] = record
            if self._pseudonym(event["user_id"]) != record["user"]:
                raise Conflict(f"{where}.user_id is not the user request {request_id} served", f"{where}.user_id")
            position = event["position"]
            if not 0 <= position < len(record["ads"]):
                raise Conflict(
                    f"{where}.position {position} is outside the {len(record['ads'])} served positions",
                    f"{where}.position",
                )
            if record["ads"][position] != event["ad_id"]:
                raise Conflict(
                    f"{where}.ad_id {event['ad_id']!r} was not served at position {position} of request {request_id}",
                    f"{where}.ad_id",
                )
            timestamp = float(event["timestamp"])
            if not math.isfinite(timestamp) or timestamp <= 0:
                raise BadRequest(f"{where}.timestamp must be seconds since the epoch, got {event['timestamp']!r}",
                                 f"{where}.timestamp")  # fmt: skip
            key = _event_id(request_id, position, event["type"])
            if key in batch_keys:  # the same event twice in this batch
                duplicates += 1
                continue
            batch_keys.add(key)
            candidates.append((event, record, position, timestamp))
        rows = []
        for event, record, position, timestamp in candidates:
            weight = 1.0
            if event["type"] == "click":
                theta = theta_covering(state.theta, position + 1)
                weight = float(click_weight(np.asarray([position]), theta, self.config.click_weight_cap)[0])
            rows.append(self._event_row(event, record, position, timestamp, weight))
        # "Already recorded?" is one atomic claim of the event's id in the store, made as it is
        # queued: of identical events posted at the same moment (threads, workers, replicas
        # sharing the store) exactly one is queued and applied, the others are duplicates. The
        # claim outlives the request record (no event of the request is accepted after it) and
        # the impressions that settle against it.
        claim_ttl = self.config.request_ttl_seconds + self.config.settle_seconds
        try:
            seqs = self.online.append_events_once([(row["event_id"], row) for row in rows], claim_ttl)
        except StoreUnavailableError as exc:
            self._store_failed(exc)
            raise
        accepted, clicks = [], 0
        for (event, record, position, timestamp), row, seq in zip(candidates, rows, seqs):
            if seq is None:
                duplicates += 1
                continue
            accepted.append((event, record, position, timestamp))
            if event["type"] == "click":
                try:  # the events are recorded: a failed vector update must not turn them into a 503
                    self._apply_click(state, record["user"], event["ad_id"], row["weight"])
                except (StoreUnavailableError, ConcurrentUpdateError) as exc:
                    self._store_failed(exc)
                clicks += 1
        self._learn_from(state, accepted)
        return {"accepted": len(accepted), "duplicates": duplicates, "clicks": clicks}

    def _event_row(self, event: Mapping[str, Any], record: Mapping[str, Any], position: int, timestamp: float,
                   weight: float) -> dict[str, Any]:  # fmt: skip
        return {
            "event_id": _event_id(event["request_id"], position, event["type"]),
            "request_id": event["request_id"],
            "user_pseudonym": record["user"],
            "ad_id": event["ad_id"],
            "position": position,
            "type": event["type"],
            "timestamp": timestamp,
            "served_at": record["served_at"],
            "policy": record["policy"],
            "propensity": record["propensities"][position],
            "score": record["scores"][position],
            "randomized": record["randomized"],
            "experiments": record["experiments"],
            "model_version": record["model_version"],
            "weight": weight,
            "fresh": record["fresh"][position] if "fresh" in record else None,  # None: served before the flags
            "explored": record["explored"][position] if "explored" in record else None,
        }

    def _apply_click(self, state: ModelState, pseudonym: str, ad_id: str, weight: float) -> None:
        """Move the user at once: their posterior learns the click (its impression settles later
        as clicked and is not taught again), or the EMA steps ``weight`` times toward the ad."""
        try:
            row = state.index.vectors(np.asarray([state.index.slot_of(ad_id)], dtype=np.int64))[0]
        except UnknownAdError:
            return  # retired since it was served: the click is logged, the vector is not moved
        prior = state.user_prior
        if prior is not None:
            base_belief = state.user_belief(pseudonym, None)[0]

            def learn(current: np.ndarray | None) -> np.ndarray:
                belief = base_belief if current is None else state.user_belief(pseudonym, current)[0]
                return belief_to_record(update_belief(belief, prior, row[None, :], np.ones(1), np.ones(1)), prior)

            with _one_blas_thread():
                self.online.update_user(state.space, pseudonym, learn)
            return
        ad = row[:-1]
        alpha = 1.0 - (1.0 - self.config.alpha) ** weight  # weight clicks = that many EMA steps
        base = state.user_vector(pseudonym, None)[0]

        def ema(current: np.ndarray | None) -> np.ndarray:
            u = base if current is None else current[: len(base)]  # a posterior record starts with the mean
            moved = (1.0 - alpha) * u.astype(np.float64) + alpha * ad.astype(np.float64)
            norm = np.linalg.norm(moved)
            return (moved / norm if norm > 1e-12 else u).astype(np.float32)

        self.online.update_user(state.space, pseudonym, ema)

    def _learn_from(self, state: ModelState, accepted: list) -> None:
        """Impressions wait ``settle_seconds`` for their click (an impression taught as a skip
        before its click arrives would count twice), then teach the posterior with their
        outcome. Clicks wait nowhere here: an impression settles as clicked when its click's
        claim is in the store, whenever and at whichever replica the click arrived."""
        now = self._clock()
        with self._learn_lock:
            for event, record, position, _ in accepted:
                if event["type"] != "click":
                    self._unsettled.append({"key": (event["request_id"], position), "user": record["user"],
                                            "ad": event["ad_id"], "position": position, "at": now})  # fmt: skip

    def settle(self, now: float | None = None) -> int:
        """Teach the posterior every impression older than ``settle_seconds``, then share the
        fresh ads' effects with the other replicas and take up theirs (or a retirement);
        returns how many impressions were learnt."""
        learnt = self._learn_settled(now)
        state = self._state
        if state is not None and state.fresh.enabled:
            state.fresh.sync(self.online, fresh_effects_blob(state.space))
        return learnt

    def _learn_settled(self, now: float | None) -> int:
        now = self._clock() if now is None else now
        with self._learn_lock:
            ready = [i for i in self._unsettled if now - i["at"] >= self.config.settle_seconds]
            self._unsettled = [i for i in self._unsettled if now - i["at"] < self.config.settle_seconds]
        if not ready:
            return 0
        try:
            clicked = self.online.recorded_events([_event_id(*i["key"], "click") for i in ready])
        except Exception:
            with self._learn_lock:  # the store did not answer: these settle at the next try
                self._unsettled = ready + self._unsettled
            raise
        state = self.state
        users, ads, kept, pseudonyms = [], [], [], []
        for impression, was_clicked in zip(ready, clicked):
            try:
                slot = state.index.slot_of(impression["ad"])
            except UnknownAdError:
                continue
            users.append(state.user_vector(impression["user"], None)[0])
            ads.append(slot)
            kept.append((impression["position"], was_clicked))
            pseudonyms.append(impression["user"])
        if not kept:
            return 0
        positions = np.asarray([p for p, _ in kept])
        theta = theta_covering(state.theta, int(positions.max()) + 1)
        slots = np.asarray(ads, dtype=np.int64)
        user_rows, ad_rows = np.asarray(users, dtype=np.float32), state.index.vectors(slots)
        outcomes = np.asarray([c for _, c in kept], dtype=float)
        with _one_blas_thread():
            state.posterior.update_position_aware(user_rows, ad_rows, outcomes, positions, theta)
            if state.fresh.view().count:  # fresh ads with an effect to learn
                offsets = ad_features(user_rows, ad_rows) @ self._ranking_posterior(state).mean()
                state.fresh.update_position_aware(slots, offsets, outcomes, positions, theta)
            if state.user_prior is not None:
                self._learn_skips(state, pseudonyms, ad_rows, outcomes, positions, theta)
        return len(kept)

    def _learn_skips(self, state: ModelState, pseudonyms: list[str], ad_rows: np.ndarray, outcomes: np.ndarray,
                     positions: np.ndarray, theta: np.ndarray) -> None:  # fmt: skip
        """Each user's posterior learns their settled skips, weighted by ``P(examined | skipped)``
        (their clicks taught it when they arrived). A store outage loses the skips of the users
        not yet written (the events themselves are logged), never the batch: the first
        unavailable write ends the loop, so a stalled store costs one timeout, not one per user."""
        prior = state.user_prior
        assert prior is not None
        weights = impression_weights(positions, outcomes, theta)
        rows_of: dict[str, list[int]] = {}
        for row in np.flatnonzero(outcomes == 0).tolist():
            rows_of.setdefault(pseudonyms[row], []).append(row)
        for pseudonym, rows in rows_of.items():
            base_belief = state.user_belief(pseudonym, None)[0]
            taught = ad_rows[rows], np.zeros(len(rows)), weights[rows]

            def learn(current: np.ndarray | None, base_belief: UserBelief = base_belief,
                      taught: tuple = taught, pseudonym: str = pseudonym) -> np.ndarray:  # fmt: skip
                belief = base_belief if current is None else state.user_belief(pseudonym, current)[0]
                return belief_to_record(update_belief(belief, prior, *taught), prior)

            try:
                self.online.update_user(state.space, pseudonym, learn)
            except ConcurrentUpdateError as exc:
                self._store_failed(exc)
            except StoreUnavailableError as exc:
                self._store_failed(exc)
                return

    def flush(self) -> int:
        """Settle impressions (which shares the fresh ads' effects), then write queued events
        as files into the source folder."""
        try:
            self.settle()
        except (Unavailable, StoreUnavailableError):
            pass
        try:
            written = self.flusher.flush(self.config.flush_batch, known_ads=self._catalog_ids())
        except Exception as exc:
            since = self._flush_error[0] if self._flush_error else self._clock()
            self._flush_error = (since, f"{type(exc).__name__}: {exc}")
            raise
        self._flush_error = None
        return written

    def _store_failed(self, exc: Exception) -> None:
        """Remember a failed store call for ``/healthz`` (the caller decides what to answer)."""
        self._store_trouble = (self._clock(), str(exc))
        log.warning("online store call failed: %s", exc)

    def _catalog_ids(self) -> Container[str]:
        """The served snapshot's catalogue ids, for membership tests (its own mapping: a
        frozenset copy of a large catalogue held the GIL on every flush)."""
        state = self._state
        return state.catalog_row.keys() if state is not None else frozenset()

    # ------------------------------------------------------------------ ads
    def add_ad(
        self, ad_id: str, text: str, image: bytes | None, content: np.ndarray | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """``content``: the ad's vector from the snapshot's encoder when the caller already
        has it (simulations replaying an encoded catalogue); the API always encodes.
        ``fields``: its structured fields, each one the snapshot's projector declares."""
        state = self.state
        cells = self._check_fields(state, fields or {})
        if not isinstance(ad_id, str) or not ad_id.strip() or len(ad_id) > MAX_ID_CHARS:
            raise BadRequest(f"ad_id must be 1 to {MAX_ID_CHARS} characters", "ad_id")
        if _AD_ID_REFUSED.search(ad_id):
            raise BadRequest(f"ad_id {ad_id!r} must not contain '/' or control characters, nor start or end with a "
                             "blank: it is a path segment of /v1/ads/{ad_id}", "ad_id")  # fmt: skip
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("text must be non-empty ad copy", "text")
        if len(text) > self.config.max_text_chars:
            raise BadRequest(f"text has {len(text)} characters, more than {self.config.max_text_chars}", "text")
        if ad_id in state.catalog_row:
            raise Conflict(
                f"ad {ad_id!r} is retired from the catalogue of snapshot {state.version}: catalogue ads come back "
                "through the source; add the new one under another id"
                if not is_live(state.index, ad_id)
                else f"ad {ad_id!r} is in the catalogue of snapshot {state.version}; retire it first or choose another id",
                "ad_id",
            )
        if is_live(state.index, ad_id):
            raise Conflict(f"ad {ad_id!r} already exists; retire it first or choose another id", "ad_id")
        if image is not None:
            if len(image) > self.config.max_image_bytes:
                raise BadRequest(
                    f"image has {len(image)} bytes, more than {self.config.max_image_bytes}", "image_base64"
                )
            _check_image(image, self.config.max_image_pixels)
        if content is None:
            if self._encoder is None:
                raise Unavailable(f"new ads cannot be encoded right now: {self._encoder_error}")
            content = self._encode(ad_id, text, image)
        vector, bias = project_content(state.projector, content[None, :], {k: [v] for k, v in cells.items()})
        meta = {"text": text, "image": "1" if image is not None else "0", "fields": json.dumps(cells, sort_keys=True)}
        # One atomic claim of the id in the store (shared by workers and replicas): of
        # concurrent adds of one id exactly one gets here; the others wrote nothing.
        added_at = self.online.add_live_ad(ad_id, content, meta)
        if added_at is None:
            raise Conflict(f"ad {ad_id!r} already exists (added by another request); retire it first or choose "
                           "another id", "ad_id")  # fmt: skip
        if image is not None:  # written only by the claim's winner, so a refused upload leaves no blob
            try:
                self.online.put_arrays(f"image.{_blob_name(ad_id)}", {"bytes": np.frombuffer(image, dtype=np.uint8)})
            except BaseException:
                with contextlib.suppress(Exception):
                    self.online.drop_live_ad(ad_id)  # all or nothing: no live ad without its image
                raise
        if is_live(state.index, ad_id) or ad_id in state.live_meta:  # re-added after retirement: a new copy
            with contextlib.suppress(UnknownAdError):
                state.fresh.remove(np.asarray([state.index.slot_of(ad_id)], dtype=np.int64))
        state.live_meta[ad_id] = meta
        state.live_added[ad_id] = added_at
        slot = state.index.add(ad_id, vector[0], float(bias[0]))
        register_fresh(state, [ad_id])
        return {"ad_id": ad_id, "model_version": state.version, "score_bias": float(bias[0]), "slot": slot}

    @staticmethod
    def _check_fields(state: ModelState, fields: Mapping[str, Any]) -> dict[str, str]:
        """Declared fields as text cells (a JSON number as its decimal text); an undeclared
        name, a value that is neither a string nor a number, or a numeric field that is no
        number is a 422 naming ``fields.<name>``."""
        declared = {f.spec.name: f.spec for f in state.projector.model.fields.fields}
        cells = {}
        for name, value in fields.items():
            spec = declared.get(name)
            if spec is None:
                known = sorted(declared) or "none: this source declares no ad fields"
                raise BadRequest(f"{name!r} is not a declared ad field (declared: {known})", f"fields.{name}")
            ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
            cell = value if isinstance(value, str) else str(value)
            if not ok or len(cell) > MAX_FIELD_CHARS:
                raise BadRequest(f"field {name!r} must be a string of at most {MAX_FIELD_CHARS} characters or a number",
                                 f"fields.{name}")  # fmt: skip
            if spec.kind == NUMERIC and cell.strip() and parse_number(cell) is None:
                raise BadRequest(f"field {name!r} is numeric; {cell[:40]!r} is not a finite number", f"fields.{name}")
            cells[name] = cell
        return cells

    def _encode(self, ad_id: str, text: str, image: bytes | None) -> np.ndarray:
        if image is None:
            return self._encoder.encode([text], [None]).vectors[0]
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"adrec-new-ad-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(mode=0o700)
        try:
            path = folder / "image"
            path.write_bytes(image)
            result = self._encoder.encode([text], [str(path)], ImageAccess(root=str(folder), max_bytes=len(image)))
            if result.n_image_failures:
                raise BadRequest(
                    f"image of ad {ad_id!r} could not be decoded ({result.image_failures[0][2]})", "image_base64"
                )
            return result.vectors[0]
        finally:
            for child in folder.iterdir():
                child.unlink()
            folder.rmdir()

    def retire_ad(self, ad_id: str) -> dict[str, Any]:
        state = self.state
        if not is_live(state.index, ad_id):
            known = ad_id in state.catalog_row or ad_id in state.live_meta
            raise (Conflict(f"ad {ad_id!r} is already retired", "ad_id") if known
                   else NotFound(f"ad {ad_id!r} is not in the catalogue", "ad_id"))  # fmt: skip
        self.online.retire_ad(ad_id)
        with contextlib.suppress(UnknownAdError):  # the reload thread or a concurrent DELETE removed it first
            state.fresh.remove(np.asarray([state.index.slot_of(ad_id)], dtype=np.int64))
            state.index.remove(ad_id)
        return {"ad_id": ad_id, "retired": True, "model_version": state.version}

    def ad_image(self, ad_id: str) -> bytes:
        state = self.state
        row = state.catalog_row.get(ad_id)
        if row is not None and state.catalog.image_paths[row]:
            try:
                return ImageAccess(root=state.catalog.image_root or None,
                                   max_bytes=self.config.max_image_bytes).read(state.catalog.image_paths[row])  # fmt: skip
            except OSError as exc:
                raise NotFound(f"the image of ad {ad_id!r} cannot be read ({type(exc).__name__})", "ad_id") from None
        if ad_id in state.live_meta and state.live_meta[ad_id].get("image") == "1":
            blob = self.online.get_arrays(f"image.{_blob_name(ad_id)}")
            if blob is not None:
                return blob["bytes"].tobytes()
        raise NotFound(f"ad {ad_id!r} has no image", "ad_id")

    # ------------------------------------------------------------------ health
    def health(self) -> dict[str, Any]:
        """What is served and whether everything it needs works; ``status`` is "degraded" with
        the ``reasons`` when the store cannot be read or written, the flush fails or the
        encoder could not load. Never raises."""
        state = self._state
        reasons = []
        if state is None:
            reasons.append("no published snapshot is loaded")
        store_ok = self.online.ping()
        if not store_ok:
            reasons.append("the online store does not answer")
        trouble = self._store_trouble
        if trouble is not None and self._clock() - trouble[0] < STORE_TROUBLE_SECONDS:
            reasons.append(f"an online store call failed {self._clock() - trouble[0]:.0f} s ago: {trouble[1]}")
        if self._flush_error is not None:
            since, what = self._flush_error
            reasons.append(f"flushing events into the source fails since {self._clock() - since:.0f} s: {what}")
        loading = self._encoder_error == "the encoder is loading"
        if self._encoder is None and self.config.load_encoder and not loading and self._encoder_error:
            reasons.append(f"new ads cannot be encoded: {self._encoder_error}")
        pending = -1
        if store_ok:
            try:
                pending = len(self.online.pending_events(PENDING_SHOWN))
            except Exception as exc:  # noqa: BLE001 - health never raises; it says why
                reasons.append(f"the online store's event queue cannot be read: {type(exc).__name__}: {exc}")
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "source": self.config.source,
            "model_version": state.version if state else None,
            "n_ads": len(state.index) if state else 0,
            "index_kind": state.index.kind if state else None,
            "store": "ok" if store_ok else "unreachable",
            "encoder": "ready" if self._encoder is not None else self._encoder_error,
            "pending_events": pending,
        }


@functools.lru_cache(maxsize=4)
def _shared_prior(dim: int) -> LaplaceLogisticPosterior:
    """The shared click model before any feedback (never updated: safe to share)."""
    return LaplaceLogisticPosterior.prior(dim)


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    """The loaded BLAS libraries, found once: ``threadpool_limits`` scans every loaded library
    on each call, which cost more than the rest of a greedy request."""
    return ThreadpoolController()


_BLAS_PINNED = False


def pin_blas_to_one_thread() -> None:
    """For serving processes (``python -m adrec_assets.serve``): NumPy's BLAS on one thread for
    the process's lifetime, so requests skip paying for the per-call limit below. Not
    called by the library itself: it changes a process-wide setting."""
    global _BLAS_PINNED
    _blas_controller().limit(limits=1, user_api="blas")  # applies at once; never restored
    _BLAS_PINNED = True


def _one_blas_thread() -> Any:
    """Per-request NumPy on one BLAS thread (tiny matrices: threads only add latency)."""
    return contextlib.nullcontext() if _BLAS_PINNED else _blas_controller().limit(limits=1, user_api="blas")


@functools.lru_cache(maxsize=2)
def shared_encoder(name: str) -> Any:
    """The encoder of a name, loaded once per process (replicas in one process share it)."""
    from adrec_assets.ml.encoders import build_encoder

    return build_encoder(name)


def _blob_name(ad_id: str) -> str:
    return hashlib.sha256(ad_id.encode()).hexdigest()[:32]


def _check_image(data: bytes, max_pixels: int) -> None:
    """Refuse bytes that are no image, or an image of more than ``max_pixels`` pixels, before
    anything decodes it. ``Image.open`` reads the header only (the size is there) and
    ``verify`` checks the file's structure without decoding a pixel; decoding costs memory
    and time by width x height, which a few hundred kB of PNG can make billions."""
    from PIL import Image, UnidentifiedImageError

    limit = f"the limit of {max_pixels} pixels (ADREC_SERVE_MAX_IMAGE_PIXELS)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise TooLarge(f"image is {width} x {height} = {width * height} pixels, more than {limit}",
                               "image_base64")  # fmt: skip
            image.verify()
    except Image.DecompressionBombError:  # past Pillow's own limit, refused while opening
        raise TooLarge(f"image has more pixels than Pillow opens, more than {limit}", "image_base64") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadRequest(f"image_base64 is not a readable image ({type(exc).__name__})", "image_base64") from None
