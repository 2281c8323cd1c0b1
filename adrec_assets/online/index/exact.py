"""Exact search as the reference that ANN results are judged against: :func:`exact_top_k`
and :func:`recall_at_k` (of either backend, e.g. the ``ad_index`` asset's recall@10)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from adrec_assets.online.index.common import (
    _EXACT_BLOCK_ELEMENTS,
    InvalidQueryError,
    _check_k,
    _check_queries,
    _exact_thresholds,
    _hit_share,
    _no_results,
)

if TYPE_CHECKING:
    from adrec_assets.online.index.faiss import AdIndex
    from adrec_assets.online.index.numpy import NumpyIndex


class _TopK:
    """Streaming exact top-k over blocks of rows (best first; ties -> lower row first)."""

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n_queries, 0), -np.inf, dtype=np.float64)
        self.rows = np.zeros((n_queries, 0), dtype=np.int64)

    def push(self, block_scores: np.ndarray, first_row: int) -> None:
        rows = np.broadcast_to(
            np.arange(first_row, first_row + block_scores.shape[1], dtype=np.int64), block_scores.shape
        )
        scores = np.concatenate([self.scores, block_scores], axis=1)
        rows = np.concatenate([self.rows, rows], axis=1)
        if scores.shape[1] > self.k:
            keep = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, keep, axis=1)
            rows = np.take_along_axis(rows, keep, axis=1)
        self.scores, self.rows = scores, rows

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        n, have = self.scores.shape
        order = np.lexsort((self.rows, -self.scores), axis=1) if have else np.zeros((n, 0), dtype=np.int64)
        scores, rows = _no_results(n, self.k)
        scores[:, :have] = np.take_along_axis(self.scores, order, axis=1)
        rows[:, :have] = np.take_along_axis(self.rows, order, axis=1)
        return scores, rows


def exact_top_k(vectors_with_bias: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product top-k in NumPy (float64 scores): the reference that ANN
    results are judged against. Returns ``(scores (n, k) float32, rows (n, k) int64)`` with
    rows into ``vectors_with_bias``, best first, ``-1`` / ``-inf`` padding when k > rows."""
    base = np.asarray(vectors_with_bias)
    if base.ndim != 2 or base.dtype.kind not in "fiu":
        raise InvalidQueryError(f"vectors_with_bias: expected (n, d+1), got shape {base.shape}")
    q = _check_queries(queries, base.shape[1]).astype(np.float64)
    k = _check_k(k)
    top = _TopK(len(q), k)
    block = max(1, _EXACT_BLOCK_ELEMENTS // max(1, len(q)))
    for start in range(0, len(base), block):
        top.push(q @ base[start : start + block].astype(np.float64).T, start)
    return top.result()


def recall_at_k(index: AdIndex | NumpyIndex, queries: np.ndarray, k: int, *, threads: int = 2) -> float:
    """Mean recall@k of ``index.search`` against exact NumPy search over the index's live ads.

    Tie-aware: a returned ad counts as a hit when its true score reaches the k-th best exact
    score (duplicate ads with equal scores are interchangeable), recomputed here from the
    stored rows rather than trusted from faiss. Call it on an index no one is changing.
    An index with no live ads has nothing to miss: 1.0.
    """
    q = _check_queries(queries, index.dim + 1)
    k = _check_k(k)
    if len(index.live_slots()) == 0 or len(q) == 0:
        return 1.0
    thresholds, k_eff = _exact_thresholds(index, q, k)
    _, slots = index.search(q, k, threads=threads)
    return _hit_share(index, q, slots, thresholds, k_eff)
