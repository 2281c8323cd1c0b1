"""What one published snapshot serves with: :class:`ModelState`, and how a snapshot and the
online store's live ads become it.

:func:`load_state` loads a snapshot completely (its ad index, served users, prior, projector,
position bias, posterior), then applies the store's live ads and retirements;
:func:`apply_live_ads` applies those recorded since (by this replica or another). A live ad
is its stored content vector projected with the snapshot's projector
(:func:`project_content`), so the same ad serves the same in every replica.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from adrec_assets.ml.models import TrainedProjector
from adrec_assets.ml.scoring import USER_KNOWN, resolve_user_vector
from adrec_assets.ml.types import AdCatalog, GlobalMean, UserEmbeddings
from adrec_assets.online.fresh_ads import (
    DEFAULT_FRESH_PRIOR_SD,
    FreshAdEffects,
    effects_from_arrays,
    untrained_rows,
)
from adrec_assets.online.index import AdIndex, IndexedAds, NumpyIndex, UnknownAdError
from adrec_assets.online.policy import todays_query
from adrec_assets.online.posterior import LaplaceLogisticPosterior, score_scale
from adrec_assets.online.store import OnlineStore
from adrec_assets.online.user_posterior import DEFAULT_RANK, UserBelief, UserPrior, belief_from_record
from adrec_assets.snapshots import Snapshot, SnapshotStore


@dataclass
class ModelState:
    """Everything one published snapshot serves with. Immutable but for the index, which
    takes live ads and retirements (it locks internally)."""

    snapshot: Snapshot
    catalog: AdCatalog
    users: UserEmbeddings
    prior: GlobalMean
    projector: TrainedProjector
    indexed: IndexedAds
    theta: np.ndarray  # examination probability per position (ones: no correction known)
    posterior: LaplaceLogisticPosterior
    fresh: FreshAdEffects  # thompson's per-ad effects of the ads without training clicks
    live_meta: dict[str, dict[str, str]] = field(default_factory=dict)  # live ad id -> {"text", "image"}
    catalog_row: dict[str, int] = field(default_factory=dict)
    live_added: dict[str, float] = field(default_factory=dict)  # live ad id -> added_at of the copy indexed
    live_version: int = -1  # the store's live_version this state has applied
    user_prior: UserPrior | None = None  # the per-user posteriors' prior (None: EMA user updates)
    known_user_spread: float = 1.0  # a known user's prior spread, a multiple of the population's

    @property
    def version(self) -> str:
        return self.snapshot.id

    @property
    def space(self) -> str:
        return self.users.space

    @property
    def index(self) -> AdIndex:
        return self.indexed.index

    def user_vector(self, pseudonym: str, online: np.ndarray | None) -> tuple[np.ndarray, str]:
        """(vector, user status): see :func:`~adrec_assets.ml.scoring.resolve_user_vector`."""
        if online is not None:
            online = online[: self.users.dim]  # a posterior record starts with the user's mean
        return resolve_user_vector(self.users, self.prior, pseudonym, online)

    def user_belief(self, pseudonym: str, online: np.ndarray | None) -> tuple[UserBelief, str]:
        """(the user's posterior, user status): their stored record, else the prior around
        their served vector (the global mean for a new user)."""
        if self.user_prior is None:
            raise ValueError("user_belief: this state was loaded without a user prior (EMA user updates)")
        base, status = self.user_vector(pseudonym, None)
        spread = self.known_user_spread if status == USER_KNOWN else 1.0
        if online is None:
            return belief_from_record(None, base, self.user_prior, spread), status
        return belief_from_record(online, base, self.user_prior, spread), self.user_vector(pseudonym, online)[1]


def fresh_effects_blob(space: str) -> str:
    """The online store's blob of the fresh ads' learnt effects in one user space."""
    return f"fresh-effects.{space}"


def _posterior_of(
    store: SnapshotStore, snapshot: Snapshot, dim: int, fresh_prior_sd: float, online: OnlineStore, space: str
) -> tuple[LaplaceLogisticPosterior, FreshAdEffects]:
    """The snapshot's posterior and the fresh ads' learnt effects: the online store's (every
    replica merges into it, see :meth:`FreshAdEffects.sync`), which also holds the live ads
    the ``policy_posterior`` replay cannot see, else the replay's; so a restart or another
    replica starts from what all of them learnt."""
    stored = online.get_arrays(fresh_effects_blob(space))
    learnt = effects_from_arrays(stored)[0] if stored is not None else {}
    if "policy_posterior" in snapshot.artifacts:
        artifact = store.load("policy_posterior", snapshot)
        return artifact.posterior, FreshAdEffects(dim, fresh_prior_sd, {**artifact.fresh, **learnt})
    return LaplaceLogisticPosterior.prior(dim), FreshAdEffects(dim, fresh_prior_sd, learnt)


def _untrained_ads(store: SnapshotStore, snapshot: Snapshot, catalog: AdCatalog) -> list[str]:
    """Catalogue ads without a click in the snapshot's training graph (all of them when the
    snapshot has no graph): the fresh ads Thompson gives a random effect."""
    if "click_graph" not in snapshot.artifacts:
        return catalog.ad_ids.tolist()
    graph = store.load("click_graph", snapshot)
    return catalog.ad_ids[untrained_rows(catalog.ad_ids, graph.ad_ids, graph.ad_degrees())].tolist()


def register_fresh(state: ModelState, ad_ids: Sequence[str]) -> None:
    """Give live ads of the index (new or untrained) their random effect."""
    if not state.fresh.enabled or not ad_ids:
        return
    slots = np.asarray([state.index.slot_of(ad) for ad in ad_ids], dtype=np.int64)
    state.fresh.register(list(ad_ids), slots, state.index.vectors(slots), score_scale(state.posterior.mean()))


def _theta_of(store: SnapshotStore, snapshot: Snapshot) -> np.ndarray:
    if "position_bias" in snapshot.artifacts:
        return np.asarray(store.load("position_bias", snapshot).theta, dtype=np.float64)
    return np.ones(1, dtype=np.float64)


def load_state(
    snapshots: SnapshotStore,
    snapshot: Snapshot,
    online: OnlineStore,
    index_backend: str = "faiss",
    prior_depth: int = 1000,
    fresh_prior_sd: float = DEFAULT_FRESH_PRIOR_SD,
    fresh_scope: str = "live",
    user_rank: int | None = DEFAULT_RANK,
    user_prior_spread: float = 1.0,
    known_user_spread: float = 1.0,
) -> ModelState:
    """Load ``snapshot`` completely, then apply the store's live ads and retirements;
    ``index_backend`` "numpy" serves its ads from a :class:`NumpyIndex` instead of FAISS.

    The new users' query ``[global_mean, 1]`` is pinned in the index (exact top
    ``prior_depth``, :meth:`AdIndex.pin_query`): they all share it, so one exact scan
    serves every one of them exactly instead of an approximate search each. ``user_rank``:
    the per-user posteriors' prior is the served users' spread in that many principal
    directions (times ``user_prior_spread``, and for a known user also ``known_user_spread``);
    None: no user prior (EMA user updates)."""
    indexed = snapshots.load("ad_index", snapshot)
    if index_backend == "numpy":
        indexed = IndexedAds(
            NumpyIndex.from_index(indexed.index), indexed.space, indexed.encoder_id, indexed.recall_at_10
        )
    users = snapshots.load("served_users", snapshot)
    posterior, fresh = _posterior_of(snapshots, snapshot, users.dim, fresh_prior_sd, online, users.space)
    state = ModelState(
        snapshot=snapshot,
        catalog=snapshots.load("raw_ads", snapshot),
        users=users,
        prior=snapshots.load("global_mean", snapshot),
        projector=snapshots.load("projector", snapshot),
        indexed=indexed,
        theta=_theta_of(snapshots, snapshot),
        posterior=posterior,
        fresh=fresh,
    )
    if user_rank is not None:
        vectors = users.trained_vectors()  # a space narrower than the rank learns in all of it
        state.user_prior = UserPrior.from_users(vectors, min(user_rank, vectors.shape[1]), user_prior_spread)
        state.known_user_spread = known_user_spread
    state.catalog_row = {ad: row for row, ad in enumerate(state.catalog.ad_ids.tolist())}
    state.index.pin_query(todays_query(state.prior.vector), prior_depth)
    if fresh.enabled and fresh_scope == "untrained":
        register_fresh(state, _untrained_ads(snapshots, snapshot, state.catalog))
    apply_live_ads(state, online)
    return state


def apply_live_ads(state: ModelState, online: OnlineStore) -> int:
    """Apply live ads and retirements recorded in ``online`` since ``state`` last applied them
    (by this replica or another); returns how many changes were applied. An idle poll reads
    one counter (:meth:`OnlineStore.live_version`); only when it moved are the live ads read,
    and only ads not indexed yet (or re-added since) are projected, in one batch."""
    version = online.live_version()  # read first: a change made while reading shows at the next poll
    if version == state.live_version:
        return 0
    retired = online.retired_ads()
    new = [
        live
        for live in online.live_ads()
        if live.ad_id not in state.catalog_row  # the source itself now carries it: its trained projection wins
        and live.ad_id not in retired
        and state.live_added.get(live.ad_id) != live.added_at
    ]
    if new:
        names = sorted({name for live in new for name in live_fields(live.meta)})
        cells = {name: [live_fields(live.meta).get(name, [""])[0] for live in new] for name in names}
        vectors, biases = project_content(state.projector, np.stack([live.content_vector for live in new]), cells)
        replaced = [live.ad_id for live in new if is_live(state.index, live.ad_id)]  # re-added since: a new copy
        if replaced:
            state.fresh.remove(np.asarray([state.index.slot_of(ad) for ad in replaced], dtype=np.int64))
        for live, vector, bias in zip(new, vectors, biases):
            state.index.add(live.ad_id, vector, float(bias))
            state.live_meta[live.ad_id] = dict(live.meta)
            state.live_added[live.ad_id] = live.added_at
        register_fresh(state, [live.ad_id for live in new])
    gone = [ad for ad in retired if is_live(state.index, ad)]
    if gone:
        state.fresh.remove(np.asarray([state.index.slot_of(ad) for ad in gone], dtype=np.int64))
        state.index.remove_many(gone)
    state.live_version = version
    return len(new) + len(gone)


def is_live(index: AdIndex, ad_id: str) -> bool:
    """Whether ``ad_id`` is in ``index`` now (added and not retired)."""
    try:
        index.slot_of(ad_id)
        return True
    except UnknownAdError:
        return False


def project_content(
    projector: TrainedProjector, content: np.ndarray, field_cells: Mapping[str, Sequence[str]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(unit projected vectors, score biases) of content vectors and their ads' structured
    fields: what ``ad_projected`` computes."""
    from adrec_assets.ml.training import project_with_bias

    return project_with_bias(projector.model, content, field_cells)


def live_fields(meta: Mapping[str, str]) -> dict[str, list[str]]:
    """A live ad's structured fields (stored as JSON in its meta) as one-row cells."""
    return {name: [value] for name, value in json.loads(meta.get("fields", "{}")).items()}
