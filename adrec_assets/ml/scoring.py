"""Serving-side scoring: cos(user, projected ad) + the ad's popularity bias, with the
cold-start prior for new users."""

from __future__ import annotations

import numpy as np

from adrec_assets.ml.types import ArtifactError, Embeddings, GlobalMean


def user_vector(users: Embeddings, prior: GlobalMean, pseudonym: str) -> tuple[np.ndarray, bool]:
    """The user's trained vector, or the global mean for a user never seen in clicks.

    Returns (vector, known).
    """
    rows = np.flatnonzero(users.ids == pseudonym)
    if len(rows):
        return users.vectors[rows[0]], True
    return prior.vector, False


def top_k_ads(user: np.ndarray, ads: Embeddings, users_space: str, k: int = 10) -> list[tuple[str, float]]:
    """The k ads with the highest score: cosine to ``user`` (all vectors are unit length)
    plus the ad's ``score_bias`` (content-predicted popularity) when the artifact has one.

    Refuses to compare vectors from different trained user spaces: a projector trained
    against yesterday's user vectors does not map into today's.
    """
    if ads.space != users_space:
        raise ArtifactError(
            f"projected ads live in user space {ads.space!r} but the users in {users_space!r}; "
            "re-materialize projector and ad_projected"
        )
    scores = ads.vectors @ user.astype(np.float32)
    if "score_bias" in ads.extra:
        scores = scores + ads.extra["score_bias"]
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(str(ads.ids[i]), float(scores[i])) for i in top]
