"""The model-level face: load a source's trained artifacts once, then score and recommend.

    rec = Recommender.load("data/artifacts", "synthetic")   # the source's published snapshot
    rec.recommend("3f2a...", k=10)                # a user pseudonym (new users: the global mean)
    rec.recommend(vector, k=10, exclude=["ad-1"])  # or any vector of the user space
    rec.score(pseudonym, ["ad-3", "ad-7"])

Scores with :mod:`adrec_assets.ml.scoring` (u . v_a + b_a over ``served_users`` and
``served_ads``), as the evaluations and the online service do. Plain Python: no Dagster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adrec_assets.ml.scoring import USER_KNOWN, resolve_user_vector, score_matrix, top_k
from adrec_assets.ml.types import ArtifactError, GlobalMean, ProjectedAds, UserEmbeddings
from adrec_assets.snapshots import SnapshotStore


@dataclass(frozen=True)
class Recommendation:
    ad_id: str
    score: float


class Recommender:
    """Users, the cold-start prior and every served ad of one trained user space.

    Refuses artifacts from different user spaces: a projector trained against yesterday's
    user vectors does not map into today's.
    """

    def __init__(self, users: UserEmbeddings, prior: GlobalMean, ads: ProjectedAds, version: str = "") -> None:
        spaces = {"served_users": users.space, "global_mean": prior.space, "served_ads": ads.space}
        if len(set(spaces.values())) != 1:
            raise ArtifactError(
                f"artifacts of different user spaces cannot be combined ({spaces}); "
                "re-materialize the source's pipeline so they come from one run"
            )
        self.users, self.prior, self.ads = users, prior, ads
        self.version = version  # the snapshot id these artifacts were published in
        self._ad_row = {ad_id: row for row, ad_id in enumerate(ads.ids.tolist())}

    @classmethod
    def load(cls, artifacts_root: str | Path, source: str) -> Recommender:
        """The published snapshot of ``source`` under ``artifacts_root`` (all three artifacts
        from the same snapshot, whatever is published meanwhile). A snapshot published before
        ``served_ads`` existed serves its ``ad_projected``."""
        store = SnapshotStore(artifacts_root, source)
        snapshot = store.current()
        return cls(
            store.load("served_users", snapshot),
            store.load("global_mean", snapshot),
            store.load("served_ads" if "served_ads" in snapshot.artifacts else "ad_projected", snapshot),
            snapshot.id,
        )

    @property
    def space(self) -> str:
        return self.users.space

    def user_vector(self, pseudonym: str) -> tuple[np.ndarray, bool]:
        """(vector, known): the trained vector, or the global mean for a user never seen in clicks."""
        vector, status = resolve_user_vector(self.users, self.prior, pseudonym)
        return vector, status == USER_KNOWN

    def _vector(self, user: str | np.ndarray) -> np.ndarray:
        if isinstance(user, str):
            return self.user_vector(user)[0]
        vector = np.asarray(user, dtype=np.float32)
        if vector.shape != (self.ads.dim,):
            raise ValueError(f"user vector must have shape ({self.ads.dim},), got {vector.shape}")
        return vector

    def ad_rows(self, ad_ids: Iterable[str]) -> np.ndarray:
        """Rows of ``ad_ids``; raises naming the ids that are not in the catalogue."""
        ids = list(ad_ids)
        rows = np.fromiter((self._ad_row.get(a, -1) for a in ids), dtype=np.int64, count=len(ids))
        if (rows < 0).any():
            unknown = [a for a, r in zip(ids, rows) if r < 0][:5]
            raise KeyError(f"unknown ad ids {unknown}: not in this source's projected ads")
        return rows

    def scores(self, user: str | np.ndarray) -> np.ndarray:
        """Score of every ad, in catalogue order."""
        return score_matrix(self._vector(user)[None, :], self.ads.vectors, self.ads.score_bias)[0]

    def score(self, user: str | np.ndarray, ad_ids: Iterable[str]) -> np.ndarray:
        rows = self.ad_rows(ad_ids)
        return score_matrix(self._vector(user)[None, :], self.ads.vectors[rows], self.ads.score_bias[rows])[0]

    def recommend(self, user: str | np.ndarray, k: int = 10, exclude: Iterable[str] = ()) -> list[Recommendation]:
        """The ``k`` best ads for a pseudonym or a vector, best first, without ``exclude``."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        scores = self.scores(user)
        excluded = [self._ad_row[a] for a in exclude if a in self._ad_row]
        if excluded:
            scores = scores.copy()
            scores[excluded] = -np.inf
            k = min(k, len(scores) - len(set(excluded)))
        return [Recommendation(str(self.ads.ids[i]), float(scores[i])) for i in top_k(scores, k)]
