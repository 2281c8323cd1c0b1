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


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
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


def ndcg_at_k(scores: np.ndarray, relevant: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Per-row binary NDCG@k: DCG of the top k (gain 1/log2(rank + 1), ranks from 1) over the
    DCG of an ideal ranking of ``min(k, n_relevant)`` hits; NaN for rows with no relevant item.
    Ties are broken at random, as in :func:`recall_at_k`."""
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    rng = rng or np.random.default_rng(0)
    k = min(k, scores.shape[1])
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    top = rank_with_random_ties(scores, rng)[:, :k]
    gains = np.take_along_axis(relevant.astype(bool), top, axis=1)
    dcg = (gains * discounts).sum(axis=1)
    n_rel = relevant.astype(bool).sum(axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_rel, k)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, dcg / np.where(ideal > 0, ideal, 1.0), np.nan)


def auc_per_row(scores: np.ndarray, relevant: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """Per-row ROC AUC: probability that a random relevant item outscores a random
    irrelevant one, ties counting one half (the expectation under random tie-breaking).

    ``candidates`` (bool, same shape) limits each row to its eligible items (e.g. to drop
    items the user already saw in training). NaN for rows without both classes.
    Computed from mid-ranks (Mann-Whitney U), O(n log n) per row.
    """
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    candidates = np.ones(scores.shape, dtype=bool) if candidates is None else candidates.astype(bool)
    relevant = relevant.astype(bool) & candidates
    out = np.full(len(scores), np.nan)
    for row in range(len(scores)):
        eligible = candidates[row]
        s, r = scores[row, eligible], relevant[row, eligible]
        n_pos, n_neg = int(r.sum()), int((~r).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        order = np.argsort(s, kind="stable")
        sorted_s = s[order]
        ranks = np.empty(len(s))
        # mid-rank of each run of equal scores (1-based)
        bounds = np.flatnonzero(np.diff(sorted_s)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(s)]])
        ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
        out[row] = (ranks[r].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return out
