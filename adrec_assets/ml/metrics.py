"""Ranking metrics and embedding-structure diagnostics."""

from __future__ import annotations

import numpy as np


def rank_with_random_ties(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Column indices of each row sorted by descending score; ties in random order.

    Breaking ties by index would reward whatever order ids happen to have (often
    correlated with popularity or age), so equal scores are shuffled instead.
    """
    jitter = rng.random(scores.shape)
    return np.lexsort((jitter, -scores), axis=-1)


def recall_at_k(
    scores: np.ndarray, relevant: np.ndarray, k: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Per-row recall@k: share of a row's relevant items among its top-k scores.

    ``scores`` and ``relevant`` are (n_users, n_items); rows with no relevant item get NaN
    (undefined, not zero) so callers can drop them with ``np.nanmean``.
    """
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    rng = rng or np.random.default_rng(0)
    top = rank_with_random_ties(scores, rng)[:, :k]
    hits = np.take_along_axis(relevant.astype(bool), top, axis=1).sum(axis=1)
    n_rel = relevant.astype(bool).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, hits / np.maximum(n_rel, 1), np.nan)


def group_cosine_separation(vectors: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(mean cosine within a label, mean cosine across labels) for unit-norm rows."""
    sims = vectors @ vectors.T
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    different = labels[:, None] != labels[None, :]
    return float(sims[same].mean()), float(sims[different].mean())
