"""The served score and who is scored with what, shared by every reader so they never drift.

Score = u . v_a + b_a: the served user against the served ad (``served_ads``: the content
projection for an ad without clicks, pulled toward its clickers for one with clicks) plus the
ad's score term. :func:`score_matrix` is that formula, shared by :class:`~adrec_assets.recommender.Recommender`,
both evaluations and the online service; :func:`resolve_user_vector` is which vector a user is
scored with (online, else trained, else the prior), shared by the ``Recommender`` and the
service's ``ModelState``. Plain Python: no Dagster.
"""

from __future__ import annotations

import numpy as np

from adrec_assets.ml.types import GlobalMean, UserEmbeddings


def score_matrix(user_vectors: np.ndarray, ad_vectors: np.ndarray, score_bias: np.ndarray) -> np.ndarray:
    """(n_users, n_ads) scores of ``user_vectors`` (n, d) against ads (m, d) with bias (m,)."""
    return user_vectors @ ad_vectors.T + score_bias[None, :]


USER_KNOWN, USER_UPDATED_ONLINE, USER_NEW = "known", "updated_online", "new"


def resolve_user_vector(
    users: UserEmbeddings, prior: GlobalMean, pseudonym: str, online: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """(vector, status) a user is scored with: the ``online`` vector clicks moved since the
    snapshot (:data:`USER_UPDATED_ONLINE`), else the trained vector (:data:`USER_KNOWN`), else
    the global-mean prior for a user never seen in clicks (:data:`USER_NEW`)."""
    if online is not None:
        return online.astype(np.float32), USER_UPDATED_ONLINE
    row = users.row_of(pseudonym)
    if row is not None:
        return users.vectors[row], USER_KNOWN
    return prior.vector, USER_NEW


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest of a 1-d score array, best first (stable for ties)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return top[np.argsort(-scores[top], kind="stable")]
