"""One implicit-ALS half-step in closed form, batched: the solver behind both refits.

For each row r (a user, or an ad) with entries j (its clicked ads, or its clickers) of weight w:

    x_r = (G + α Σ_j w_j f_j f_jᵀ)⁻¹ (Σ_j (1 + α w_j) f_j + prior_r)

where ``G = FᵀF + λI`` is shared by every row (Hu, Koren and Volinsky 2008) and ``prior_r`` is
λ x the row's prior mean (zero for the user refit; the ad's content projection for the ad
refit, Agarwal & Chen 2009). Rows are solved in batches of similar entry counts so padding
stays small; a row with few entries costs an m x m solve (Woodbury on ``G``'s inverse), not d x d.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

#: Entries gathered per batch (memory ~ entries x d x 8 bytes, plus the batch's d x d systems).
BATCH_ROWS = 1 << 17
MAX_BATCH = 512
THREADS = max(1, min(4, os.cpu_count() or 1))


def solve_rows(
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray,
    factors: np.ndarray,
    gram: np.ndarray,
    alpha: float,
    rows: np.ndarray,
    prior: np.ndarray | None = None,
    batch_rows: int = BATCH_ROWS,
) -> np.ndarray:
    """(len(rows), d) fits of ``rows`` of a CSR matrix (``indptr``/``indices``/``weights``)
    against ``factors`` (float64, one row per column index); ``gram`` is FᵀF + λI and
    ``prior`` (len(rows), d) is added to the targets. A row with no entry gets G⁻¹ prior (0
    without a prior)."""
    rows = np.asarray(rows, dtype=np.int64)
    d = gram.shape[0]
    inverse = np.linalg.inv(gram)
    out = np.zeros((len(rows), d)) if prior is None else np.asarray(prior, dtype=np.float64) @ inverse
    starts, degrees = indptr[rows], indptr[rows + 1] - indptr[rows]
    order = np.argsort(degrees, kind="stable")
    order = order[degrees[order] > 0]
    batches, begin = [], 0
    while begin < len(order):
        longest = int(degrees[order[min(begin + MAX_BATCH, len(order)) - 1]])
        end = min(begin + max(1, batch_rows // longest), begin + MAX_BATCH, len(order))
        batches.append(order[begin:end])
        begin = end

    def fit(batch: np.ndarray) -> None:
        extra = None if prior is None else np.asarray(prior[batch], dtype=np.float64)
        out[batch] = _batch_fits(indices, weights, factors, gram, inverse, starts[batch], degrees[batch], alpha, extra)

    # Many small systems: one BLAS thread each (threads inside BLAS only contend), batches spread
    # over the cores (numpy's matmul and solve release the GIL); the batches write disjoint rows.
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=THREADS) as pool:
        list(pool.map(fit, batches))
    return out


def _batch_fits(
    indices: np.ndarray,
    weights: np.ndarray,
    factors: np.ndarray,
    gram: np.ndarray,
    inverse: np.ndarray,
    starts: np.ndarray,
    degrees: np.ndarray,
    alpha: float,
    prior: np.ndarray | None,
) -> np.ndarray:
    """(b, d) fits of one batch, entries padded to the batch's longest row.

    With few entries per row (at most d / 2) the solve goes through the Woodbury identity on
    the shared ``gram``'s ``inverse`` H: with S the entries' factors scaled by sqrt(α w),
    (G + SᵀS)⁻¹ = H − H Sᵀ (I + S H Sᵀ)⁻¹ S H, an m x m system per row instead of d x d."""
    width = int(degrees.max())
    slot = np.arange(width)
    real = slot[None, :] < degrees[:, None]  # (b, width): an entry, not padding
    at = np.where(real, starts[:, None] + slot[None, :], 0)
    entries = factors[indices[at]] * real[..., None]  # (b, width, d), padding rows zero
    w = np.where(real, weights[at], 0.0)
    targets = np.einsum("bw,bwd->bd", (1.0 + alpha * w) * real, entries)
    if prior is not None:
        targets = targets + prior
    scaled = entries * np.sqrt(alpha * w)[..., None]
    if 2 * width > gram.shape[0]:
        systems = gram + np.matmul(np.ascontiguousarray(np.swapaxes(scaled, 1, 2)), scaled)  # contiguous: BLAS
        return np.linalg.solve(systems, targets[..., None])[..., 0]
    b, d = len(degrees), gram.shape[0]
    scaled_h = (scaled.reshape(-1, d) @ inverse).reshape(b, width, d)  # S H
    inner = np.eye(width) + np.matmul(scaled_h, np.ascontiguousarray(np.swapaxes(scaled, 1, 2)))  # I + S H Sᵀ
    h_targets = targets @ inverse
    correction = np.linalg.solve(inner, np.einsum("bwd,bd->bw", scaled, h_targets)[..., None])[..., 0]
    return h_targets - np.einsum("bw,bwd->bd", correction, scaled_h)
