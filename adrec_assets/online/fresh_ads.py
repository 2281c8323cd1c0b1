"""Per-ad random effects for fresh ads: the ads the snapshot learnt from no click.

**Why.** The shared Thompson posterior (:mod:`adrec_assets.online.posterior`) re-weights the
128 user-space dimensions, the popularity term and an intercept: one model for every ad. It
has no per-ad uncertainty, so a new ad is explored only when its projected vector happens to
be somebody's near-best, and most never are. An ad without training clicks is exactly the
one whose projected score is least trustworthy. Each such ad gets a logit offset
``r_a ~ N(m_a, 1/h_a)`` on top of the shared model::

    logit P(click | examined, u, a) = theta . phi(u, a) + r_a      (r_a = 0 for trained ads)

with prior ``N(0, (prior_sd * scale)^2)``, ``scale`` the shared model's sharpness when the
ad arrives (:func:`~adrec_assets.online.posterior.score_scale`: 1 at the prior, larger once the
posterior has learnt to spread its logits wider), so the prior means the same uncertainty in
score units throughout; Thompson draws ``r~_a`` independently per request. That prior is the
one the updates learn under; serving re-bases each effect on a prior sized to the request
(``prior_sd`` times the spread of the trained candidates' scores, the evidence kept) and
holds unearned fresh ads to a share of the slate (:class:`~adrec_assets.online.policy.ThompsonPolicy`). Ads
with training clicks have no offset (the snapshot's projection and popularity term already
learnt from their clicks), which keeps the folded index query exact for them: a request
scans the fresh ads exactly (one small product) beside the index search, see
:class:`~adrec_assets.online.policy.ThompsonPolicy`.

**Update.** Per settled event batch, a 1-d Laplace step per fresh ad: the MAP of
``sum_i w_i log p(y_i | o_i + r) + log N(r; m, 1/h)`` by Newton steps (vectorized over ads),
``o_i`` the shared posterior mean's logit of the impression, ``w_i`` the position-bias
weights of :func:`~adrec_assets.online.position_bias.impression_weights`; the new precision
is ``h + sum_i w_i p_i (1 - p_i)`` at the MAP. Cost O(impressions), a few microseconds per
batch row.

**State.** Immutable :class:`FreshView` arrays replaced as a whole (a request reads one
consistent view while a batch is folded in), keyed by index slot for serving and by ad id
for persistence (``policy_posterior`` replays the logs into the same numbers for catalogue
ads; the service keeps live ads' effects in its online store). Replicas pool what each
learnt in that store by adding natural parameters (:meth:`FreshAdEffects.sync`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy.special import expit

from adrec_assets.ml.types import isin_ids
from adrec_assets.online.position_bias import impression_weights
from adrec_assets.online.store import OnlineStore
from adrec_assets.settings import SERVE_FRESH_PRIOR_SD

DEFAULT_FRESH_PRIOR_SD: float = SERVE_FRESH_PRIOR_SD.default
NEWTON_STEPS = 50
MAX_STEP = 2.0  # logits per Newton step
NEWTON_TOLERANCE = 1e-10


class FreshView(NamedTuple):
    """One consistent state: row ``i`` is ad ``ad_ids[i]`` at index ``slots[i]``."""

    ad_ids: np.ndarray  # (n,) str
    slots: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, d + 1) float32 stored [p_a, b_a]
    mean: np.ndarray  # (n,) float64
    precision: np.ndarray  # (n,) float64
    prior_precision: np.ndarray  # (n,) float64: what the ad started from
    synced_mean: np.ndarray  # (n,) float64: the shared store's value at the last sync
    synced_precision: np.ndarray  # (n,) float64  (or the start, before the first)
    order: np.ndarray  # (n,) int64: argsort of slots, for rows_of

    def sd(self) -> np.ndarray:
        return 1.0 / np.sqrt(self.precision)

    def without(self, slots: np.ndarray) -> FreshView:
        """This view less the given slots (a request's excluded ads)."""
        keep = ~np.isin(self.slots, slots)
        return self if keep.all() else _with_order(FreshView(*(array[keep] for array in self)))

    def rows_of(self, slots: np.ndarray) -> np.ndarray:
        """The row of each slot, -1 for a slot without an effect (a binary search each)."""
        slots = np.asarray(slots, dtype=np.int64)
        if not self.count:
            return np.full(len(slots), -1, dtype=np.int64)
        sorted_slots = self.slots[self.order]
        where = np.minimum(np.searchsorted(sorted_slots, slots), self.count - 1)
        return np.where(sorted_slots[where] == slots, self.order[where], -1)

    @property
    def count(self) -> int:
        return len(self.slots)


def _empty_view(dim: int) -> FreshView:
    return FreshView(np.empty(0, dtype=object), np.empty(0, np.int64), np.empty((0, dim + 1), np.float32),
                     np.empty(0), np.empty(0), np.empty(0), np.empty(0), np.empty(0), np.empty(0, np.int64))  # fmt: skip


def _with_order(view: FreshView) -> FreshView:
    return view._replace(order=np.argsort(view.slots, kind="stable"))


def laplace_offsets(
    groups: np.ndarray, offsets: np.ndarray, clicked: np.ndarray, weights: np.ndarray,
    mean: np.ndarray, precision: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(new mean, new precision) per group: a 1-d Laplace update of each group's offset.

    ``groups`` (n,) int in ``[0, len(mean))``: which offset impression ``i`` belongs to;
    ``offsets`` (n,) the rest of its logit; ``clicked`` (n,) 0/1; ``weights`` (n,) >= 0.
    Newton on a concave 1-d objective per group (steps clipped to ``MAX_STEP`` logits, so a
    batch of only clicks or only skips walks to the optimum instead of overshooting), all
    groups at once with ``bincount``; a group without impressions keeps its prior.
    """
    count = len(mean)
    r = np.array(mean, dtype=np.float64)
    for _ in range(NEWTON_STEPS):
        p = expit(offsets + r[groups])
        gradient = np.bincount(groups, weights * (clicked - p), count) - precision * (r - mean)
        curvature = np.bincount(groups, weights * p * (1 - p), count) + precision
        step = np.clip(gradient / curvature, -MAX_STEP, MAX_STEP)  # a lopsided batch cannot overshoot
        r += step
        if np.max(np.abs(step), initial=0.0) < NEWTON_TOLERANCE:
            break
    p = expit(offsets + r[groups])
    return r, precision + np.bincount(groups, weights * p * (1 - p), count)


def untrained_rows(ad_ids: np.ndarray, clicked_ad_ids: np.ndarray, ad_degrees: np.ndarray) -> np.ndarray:
    """Rows of ``ad_ids`` without a training click (a click graph's ``ad_ids`` and
    ``ad_degrees()``): the ads a snapshot learnt nothing about."""
    clicked = np.asarray(clicked_ad_ids)[np.asarray(ad_degrees) > 0]
    return np.flatnonzero(~isin_ids(ad_ids, clicked))


class FreshAdEffects:
    """The random effects of one served state's fresh ads (thread-safe; see the module)."""

    def __init__(self, dim: int, prior_sd: float = DEFAULT_FRESH_PRIOR_SD,
                 learnt: Mapping[str, tuple[float, float]] | None = None) -> None:  # fmt: skip
        """``learnt``: ad id -> (mean, precision) from ``policy_posterior``; an ad registered
        later starts there instead of at the prior. ``prior_sd`` 0 disables the effects."""
        if not (np.isfinite(prior_sd) and prior_sd >= 0):
            raise ValueError(f"prior_sd (fresh_prior_sd): must be a finite number >= 0, got {prior_sd}")
        self.dim = dim
        self.prior_sd = float(prior_sd)
        self._learnt = dict(learnt or {})
        self._view = _empty_view(dim)
        self._forgotten: set[str] = set()  # removed since the last sync
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.prior_sd > 0

    def view(self) -> FreshView:
        return self._view

    def register(self, ad_ids: Sequence[str], slots: np.ndarray, vectors: np.ndarray, scale: float = 1.0) -> None:
        """Treat these ads (at these index slots, with these stored rows) as fresh.

        ``scale``: how much sharper the shared model ranks now than its prior
        (:func:`~adrec_assets.online.posterior.score_scale`); the prior sd grows with it, so
        a new ad's uncertainty stays the same in score units while the learnt model spreads
        its logits wider (in the MovieLens simulator the popularity weight grew from 2 to 8
        over 60k rounds, and late ads with a prior fixed in logits went unshown)."""
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: must be a finite number > 0, got {scale}")
        if not self.enabled or len(ad_ids) == 0:
            return
        slots = np.asarray(slots, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(slots), self.dim + 1) or len(ad_ids) != len(slots):
            raise ValueError(f"fresh ads: {len(ad_ids)} ids, {len(slots)} slots, vectors {vectors.shape} do not agree")
        prior = 1.0 / (self.prior_sd * scale) ** 2
        with self._lock:
            learnt = [self._learnt.get(ad, (0.0, prior)) for ad in ad_ids]
            means, precisions = [m for m, _ in learnt], [h for _, h in learnt]
            view = self._view
            self._view = _with_order(FreshView(
                np.concatenate([view.ad_ids, np.asarray(list(ad_ids), dtype=object)]),
                np.concatenate([view.slots, slots]), np.vstack([view.vectors, vectors]),
                np.concatenate([view.mean, means]), np.concatenate([view.precision, precisions]),
                np.concatenate([view.prior_precision, np.full(len(learnt), prior)]),
                np.concatenate([view.synced_mean, means]), np.concatenate([view.synced_precision, precisions]),
                view.order,
            ))  # fmt: skip

    def remove(self, slots: np.ndarray) -> None:
        """Forget retired ads (their slots die with them; the next :meth:`sync` drops them
        from the shared blob, so an id reused later starts from the prior)."""
        with self._lock:
            view = self._view
            keep = ~np.isin(view.slots, np.asarray(slots, dtype=np.int64))
            if not keep.all():
                gone = [str(ad) for ad in view.ad_ids[~keep]]
                self._forgotten.update(gone)
                for ad in gone:
                    self._learnt.pop(ad, None)
                self._view = _with_order(FreshView(*(array[keep] for array in view)))

    def update(self, slots: np.ndarray, offsets: np.ndarray, clicked: np.ndarray, weights: np.ndarray) -> int:
        """Fold impressions (index ``slots``, shared-model logits ``offsets``, 0/1
        ``clicked``, position-bias ``weights``) into the fresh ads among them; returns how
        many impressions were on fresh ads."""
        with self._lock:
            view = self._view
            found = view.rows_of(slots)
            fresh = found >= 0
            if not fresh.any():
                return 0
            rows = found[fresh]
            used = np.unique(rows)
            groups = np.searchsorted(used, rows)
            mean, precision = laplace_offsets(
                groups, np.asarray(offsets, np.float64)[fresh], np.asarray(clicked, np.float64)[fresh],
                np.asarray(weights, np.float64)[fresh], view.mean[used], view.precision[used],
            )  # fmt: skip
            new_mean, new_precision = view.mean.copy(), view.precision.copy()
            new_mean[used], new_precision[used] = mean, precision
            self._view = view._replace(mean=new_mean, precision=new_precision)
            return int(fresh.sum())

    def update_position_aware(
        self, slots: np.ndarray, offsets: np.ndarray, clicked: np.ndarray, positions: np.ndarray, theta: np.ndarray
    ) -> int:
        """:meth:`update` with the posterior's position-bias weights (click 1, skip
        ``P(examined | skipped)`` at the shared model's click rate), so an effect learns
        relevance, not attention, like the shared posterior it sits on."""
        clicked = np.asarray(clicked, dtype=np.float64)
        weights = impression_weights(
            np.asarray(positions), clicked.astype(bool), theta, predicted_relevance=expit(np.asarray(offsets))
        )
        return self.update(slots, offsets, clicked, weights)

    def sync(self, store: OnlineStore, name: str) -> int:
        """Share what this replica learnt with every other through ``store``'s blob ``name``
        and take up what they learnt; returns how many of this replica's ads it changed.

        Replicas learn from their own traffic. Each adds to the shared value of an ad only
        what it learnt since its last sync, in natural parameters (precision ``h`` and
        ``h * m`` add up over independent batches of data), in one atomic read-modify-write
        (:meth:`OnlineStore.update_arrays`), then adopts the merged value. So no replica
        overwrites another's learning, and a restart (which starts from the stored value)
        does not count its data twice. An ad the blob lacks enters with this replica's value.
        With nothing learnt since the last sync it only reads."""
        with self._lock:  # an update folded in between the read and the adoption would be lost
            view = self._view
            forgotten = set(self._forgotten)  # popped before a re-registered id adds its fresh start
            added_precision = view.precision - view.synced_precision
            added_eta = view.precision * view.mean - view.synced_precision * view.synced_mean
            changed = np.flatnonzero((added_precision != 0) | (added_eta != 0))

            def merge(stored: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
                shared = effects_from_arrays(stored)[0] if stored is not None else {}
                for ad in forgotten:
                    shared.pop(ad, None)
                for row in changed:
                    ad = str(view.ad_ids[row])
                    if ad in shared:
                        mean, precision = shared[ad]
                        precision_now = precision + added_precision[row]
                        shared[ad] = ((precision * mean + added_eta[row]) / precision_now, precision_now)
                    else:
                        shared[ad] = (float(view.mean[row]), float(view.precision[row]))
                return effects_to_arrays(shared, self.prior_sd)

            if len(changed) or forgotten:
                merged = store.update_arrays(name, merge)
                self._forgotten.clear()
            else:
                merged = store.get_arrays(name)
                if merged is None:
                    return 0
            shared = effects_from_arrays(merged)[0]
            self._learnt.update(shared)  # an ad registered later starts from the shared value
            rows = [row for row, ad in enumerate(view.ad_ids.tolist()) if ad in shared]
            if not rows:
                return 0
            mean, precision = view.mean.copy(), view.precision.copy()
            values = np.asarray([shared[str(view.ad_ids[row])] for row in rows])
            mean[rows], precision[rows] = values[:, 0], values[:, 1]
            moved = int(np.count_nonzero((mean[rows] != view.mean[rows]) | (precision[rows] != view.precision[rows])))
            self._view = view._replace(
                mean=mean, precision=precision, synced_mean=mean.copy(), synced_precision=precision.copy()
            )
            return moved

    def learnt(self) -> dict[str, tuple[float, float]]:
        """Ad id -> (mean, precision) of every fresh ad that has left its prior."""
        view = self._view
        moved = view.precision != view.prior_precision
        return {
            str(ad): (float(m), float(h))
            for ad, m, h in zip(view.ad_ids[moved], view.mean[moved], view.precision[moved])
        }


def effects_to_arrays(learnt: Mapping[str, tuple[float, float]], prior_sd: float) -> dict[str, np.ndarray]:
    """Numeric/str arrays for an artifact (no pickle)."""
    ids = sorted(learnt)
    return {
        "ad_ids": np.asarray(ids, dtype=str),
        "mean": np.asarray([learnt[a][0] for a in ids], dtype=np.float64),
        "precision": np.asarray([learnt[a][1] for a in ids], dtype=np.float64),
        "prior_sd": np.asarray(prior_sd, dtype=np.float64),
    }


def effects_from_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, tuple[float, float]], float]:
    ids = [str(a) for a in np.asarray(arrays["ad_ids"]).tolist()]
    learnt = {ad: (float(m), float(h)) for ad, m, h in zip(ids, arrays["mean"], arrays["precision"])}
    return learnt, float(arrays["prior_sd"])
