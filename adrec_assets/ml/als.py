"""Implicit-feedback ALS on the click graph: the collaborative-filtering reference.

Not part of the serving pipeline (whose user space is learned with InfoNCE over co-clicks).
It gives the evaluation its strongest classic baseline, ridge regression from content to
ALS item factors scored with a dot product, and the scale benchmark its speed reference.
``implicit`` is the well-kept reference implementation (conjugate-gradient ALS in C++).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from adrec_assets.ml.types import ClickGraph


@dataclass(frozen=True)
class AlsParams:
    factors: int = 64
    regularization: float = 0.01
    alpha: float = 1.0  # confidence = 1 + alpha * weight
    iterations: int = 15
    seed: int = 0
    threads: int = 0  # 0: all cores


@dataclass
class AlsFactors:
    users: np.ndarray  # (n_users, factors) float32, aligned with graph.user_ids
    ads: np.ndarray  # (n_ads, factors) float32, aligned with graph.ad_ids


def click_matrix(graph: ClickGraph) -> sp.csr_matrix:
    """Users x ads CSR matrix of click weights (the graph already is CSR by user)."""
    return sp.csr_matrix(
        (graph.weights.astype(np.float32), graph.indices, graph.indptr), shape=(graph.n_users, graph.n_ads)
    )


def fit_als(graph: ClickGraph, params: AlsParams = AlsParams()) -> AlsFactors:
    """Fit implicit ALS on the clicks. Deterministic for a seed: every user's (and ad's)
    least-squares solve is independent, so the thread count does not change the result."""
    from implicit.cpu.als import AlternatingLeastSquares  # imported here: a C++ extension

    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=params.seed,
            num_threads=params.threads,
        )
        model.fit(click_matrix(graph), show_progress=False)
    return AlsFactors(users=np.asarray(model.user_factors), ads=np.asarray(model.item_factors))
